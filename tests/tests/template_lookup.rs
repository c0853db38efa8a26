//! Where the chat template comes from: `chat_template.jinja`, else the template inside `chat_template.json` /
//! `processor_config.json` / `tokenizer_config.json`, else the built-in AF-Next template.

use std::path::{Path, PathBuf};

use afnext_e2e::{ckpt, tempdir};
use afnext_prompt::{Conversation, PromptProcessor};

/// tiny-a's processor files without its `chat_template.jinja`.
fn checkpoint_without_template(tag: &str) -> PathBuf {
    let d = tempdir(&format!("template-{tag}"));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ] {
        std::fs::copy(ckpt("tiny-a").join(f), d.join(f)).unwrap();
    }
    d
}

fn set_json_field(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_object_mut().unwrap().insert(key.into(), value);
    std::fs::write(path, v.to_string()).unwrap();
}

fn render(dir: &Path) -> String {
    let p = PromptProcessor::load(dir).unwrap();
    p.render(&Conversation::single_turn(None, None, "hi"))
        .unwrap()
}

#[test]
fn builtin_template_when_the_checkpoint_has_none() {
    let d = checkpoint_without_template("none");
    let p = PromptProcessor::load(&d).unwrap();
    assert_eq!(p.template().source_name, "built-in AF-Next template");
    // The built-in template is the one the fixture checkpoints ship, so the rendering is the same.
    assert_eq!(render(&d), render(&ckpt("tiny-a")));
}

#[test]
fn template_inside_tokenizer_config() {
    let d = checkpoint_without_template("tok");
    set_json_field(
        &d.join("tokenizer_config.json"),
        "chat_template",
        serde_json::json!(
            "{% for m in messages %}[{{ m.role }}]{{ m.content[0].text }}{% endfor %}"
        ),
    );
    assert_eq!(render(&d), "[user]hi");
}

#[test]
fn processor_config_wins_over_tokenizer_config_and_named_lists_use_default() {
    let d = checkpoint_without_template("proc");
    set_json_field(
        &d.join("tokenizer_config.json"),
        "chat_template",
        serde_json::json!("tokenizer"),
    );
    set_json_field(
        &d.join("processor_config.json"),
        "chat_template",
        serde_json::json!([{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "processor"}]),
    );
    assert_eq!(render(&d), "processor");
    std::fs::write(d.join("chat_template.jinja"), "jinja file").unwrap();
    assert_eq!(render(&d), "jinja file");
}
