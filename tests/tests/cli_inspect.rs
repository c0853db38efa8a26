//! `afnext inspect` end to end: the real binary on the fixtures writes the processor's tensors under the
//! reference names, and bad input makes it exit non-zero with a message instead of panicking.

use std::process::Command;

use afnext_e2e::{
    afnext_bin, assert_close, ckpt, fixtures_dir, get, load_tensors, reference, tempdir,
};

fn inspect(args: &[&str]) -> std::process::Output {
    Command::new(afnext_bin())
        .arg("inspect")
        .args(args)
        .output()
        .expect("spawn afnext")
}

#[test]
fn conversation_file_gives_reference_tensors() {
    let dir = tempdir("inspect-conv");
    let out = dir.join("speech_40s.safetensors");
    let conv = fixtures_dir().join("speech_40s.conversation.json");
    let o = inspect(&[
        "--model",
        ckpt("tiny-a").to_str().unwrap(),
        "--conversation",
        conv.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_tensors(&out).unwrap();
    let want = reference("speech_40s").unwrap();
    assert_eq!(
        get(&got, "input_ids").unwrap().shape,
        get(&want, "input_ids").unwrap().shape
    );
    assert_eq!(
        get(&got, "input_ids").unwrap().i64().unwrap(),
        get(&want, "input_ids").unwrap().i64().unwrap()
    );
    let mask = get(&got, "input_features_mask").unwrap();
    assert_eq!(mask.shape, vec![2, 3000]);
    assert_eq!(
        mask.i32().unwrap(),
        get(&want, "input_features_mask").unwrap().i32().unwrap()
    );
    let feats = get(&got, "input_features").unwrap();
    assert_eq!(feats.shape, vec![2, 128, 3000]);
    let all = feats.f32().unwrap();
    let frames = get(&want, "input_features__frames").unwrap().i64().unwrap();
    let sel: Vec<f32> = (0..2 * 128)
        .flat_map(|row| frames.iter().map(move |&f| (row, f)))
        .map(|(row, f)| all[row * 3000 + f as usize])
        .collect();
    assert_close(
        "inspect input_features",
        &sel,
        &get(&want, "input_features").unwrap().f32().unwrap(),
        2e-4,
    );
}

#[test]
fn audio_and_prompt_flags_equal_the_conversation() {
    let dir = tempdir("inspect-flags");
    let out = dir.join("speech_7s.safetensors");
    let o = inspect(&[
        "--model",
        ckpt("tiny-a").to_str().unwrap(),
        "--audio",
        fixtures_dir()
            .join("audio/speech_7s.flac")
            .to_str()
            .unwrap(),
        "--prompt",
        "Transcribe the audio.",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_tensors(&out).unwrap();
    let want = reference("speech_7s").unwrap();
    assert_eq!(
        get(&got, "input_ids").unwrap().i64().unwrap(),
        get(&want, "input_ids").unwrap().i64().unwrap()
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("175 tokens"), "{stderr}");
}

#[test]
fn bad_inputs_exit_non_zero_with_a_message() {
    let dir = tempdir("inspect-bad");
    let junk = dir.join("junk.wav");
    std::fs::write(&junk, b"RIFF\x10\x00\x00\x00WAVEfmt garbage").unwrap();
    let bad_conv = dir.join("bad.json");
    std::fs::write(
        &bad_conv,
        r#"[{"role":"user","content":[{"type":"video","path":"x.mp4"}]}]"#,
    )
    .unwrap();
    let model = ckpt("tiny-a");
    let out = dir.join("o.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--audio", junk.to_str().unwrap(), "--prompt", "x"],
            "audio 0",
        ),
        (
            vec!["--conversation", bad_conv.to_str().unwrap()],
            "part type \"video\" is not supported",
        ),
        (
            vec!["--audio", "/nonexistent.flac", "--prompt", "x"],
            "/nonexistent.flac",
        ),
        (vec!["--audio", junk.to_str().unwrap()], "give --prompt"),
    ];
    for (args, want) in cases {
        let mut all = vec![
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        all.extend(args.iter());
        let o = inspect(&all);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
