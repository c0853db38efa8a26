//! `--model` as a local directory or a Hugging Face repo id (`nvidia/audio-flamingo-next-hf`), downloaded
//! with hf-hub into the standard cache. The caller (the CLI) reads `HF_HOME`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE` and passes them in [`HubConfig`]; nothing here reads the environment.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value;

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubConfig {
    /// The hub cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`); `None` = hf-hub's default.
    pub cache_dir: Option<PathBuf>,
    /// Access token for gated or private repos.
    pub token: Option<String>,
    /// Only use what is already in the cache.
    pub offline: bool,
    /// Branch, tag or commit (default "main").
    pub revision: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
    /// Also fetch the safetensors (a router needs only the tokenizer and configs).
    pub weights: bool,
}

/// Gets one file of the repo (`required`: a miss is an error), returning its cached path.
type Fetch<'a> = dyn FnMut(&str, bool) -> Result<Option<PathBuf>> + 'a;

/// How long a download waits for another process (a pod sharing the cache) that holds the file's lock:
/// hf-hub itself gives up after 5 s, far less than a 4 GB shard takes.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Runs `get` until it does not fail on another process's download lock, or `limit` has passed (then the
/// last error is returned). `waiting` is called once, when the first lock failure is seen.
fn wait_for_lock<T>(
    mut get: impl FnMut() -> std::result::Result<T, hf_hub::api::sync::ApiError>,
    limit: std::time::Duration,
    pause: std::time::Duration,
    waiting: impl FnOnce(),
) -> std::result::Result<T, hf_hub::api::sync::ApiError> {
    let end = std::time::Instant::now() + limit;
    let mut waiting = Some(waiting);
    loop {
        match get() {
            Err(hf_hub::api::sync::ApiError::LockAcquisition(_))
                if std::time::Instant::now() < end =>
            {
                if let Some(w) = waiting.take() {
                    w();
                }
                std::thread::sleep(pause);
            }
            r => return r,
        }
    }
}

/// Files a checkpoint needs besides the weights.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// A local directory is returned as is; anything else must look like `owner/name` and is fetched (or, when
/// offline, found) in the hub cache. Returns the snapshot directory holding every file.
pub fn resolve(model: &str, cfg: &HubConfig) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let looks_like_id =
        model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/');
    if !looks_like_id {
        return Err(ModelError::Hub {
            model: model.into(),
            detail: "is neither a directory nor a Hugging Face repo id (owner/name)".into(),
        });
    }
    let revision = cfg.revision.clone().unwrap_or_else(|| "main".into());
    let repo = Repo::with_revision(model.to_string(), RepoType::Model, revision);
    let err = |detail: String| ModelError::Hub {
        model: model.into(),
        detail,
    };
    let mut fetch: Box<Fetch<'_>> = if cfg.offline {
        let cache = match &cfg.cache_dir {
            Some(d) => Cache::new(d.clone()),
            None => Cache::from_env(),
        };
        let r = cache.repo(repo);
        Box::new(move |file: &str, required: bool| match r.get(file) {
            Some(p) => Ok(Some(p)),
            None if required => Err(err(format!(
                "{file} is not in the hub cache and HF_HUB_OFFLINE is set"
            ))),
            None => Ok(None),
        })
    } else {
        let mut b = ApiBuilder::from_env().with_progress(cfg.progress);
        if let Some(d) = &cfg.cache_dir {
            b = b.with_cache_dir(d.clone());
        }
        if cfg.token.is_some() {
            b = b.with_token(cfg.token.clone());
        }
        let api = b.build().map_err(|e| err(e.to_string()))?;
        let r = api.repo(repo);
        Box::new(move |file: &str, required: bool| {
            let got = wait_for_lock(
                || r.get(file),
                LOCK_WAIT,
                std::time::Duration::from_secs(2),
                || eprintln!("afnext: another process is downloading {file}; waiting for it"),
            );
            match got {
                Ok(p) => Ok(Some(p)),
                Err(e) if required => Err(err(format!("cannot download {file}: {e}"))),
                Err(_) => Ok(None),
            }
        })
    };
    let config = fetch(REQUIRED[0], true)?.expect("required file; this is a bug");
    for f in &REQUIRED[1..] {
        fetch(f, true)?;
    }
    for f in OPTIONAL {
        fetch(f, false)?;
    }
    if !cfg.weights {
        return Ok(config
            .parent()
            .expect("a cached file has a parent directory")
            .to_path_buf());
    }
    match fetch("model.safetensors.index.json", false)? {
        Some(index) => {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index,
                source,
            })?;
            let mut shards: Vec<&str> = v
                .get("weight_map")
                .and_then(Value::as_object)
                .map(|m| m.values().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                fetch(s, true)?;
            }
        }
        None => {
            fetch("model.safetensors", true)?;
        }
    }
    Ok(config
        .parent()
        .expect("a cached file has a parent directory")
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hf_hub::api::sync::ApiError;
    use std::time::Duration;

    #[test]
    fn a_download_lock_held_elsewhere_is_waited_for_within_the_limit() {
        let mut calls = 0;
        let mut told = 0;
        let r = wait_for_lock(
            || {
                calls += 1;
                if calls < 4 {
                    Err(ApiError::LockAcquisition("x.lock".into()))
                } else {
                    Ok(calls)
                }
            },
            Duration::from_secs(5),
            Duration::from_millis(1),
            || told += 1,
        );
        assert_eq!(r.unwrap(), 4);
        assert_eq!(told, 1);
        // Past the limit the lock error is returned; other errors at once.
        let r: std::result::Result<(), _> = wait_for_lock(
            || Err(ApiError::LockAcquisition("x.lock".into())),
            Duration::from_millis(20),
            Duration::from_millis(5),
            || {},
        );
        assert!(matches!(r, Err(ApiError::LockAcquisition(_))));
        let mut n = 0;
        let r: std::result::Result<(), _> = wait_for_lock(
            || {
                n += 1;
                Err(ApiError::IoError(std::io::Error::other("network")))
            },
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {},
        );
        assert!(r.is_err());
        assert_eq!(n, 1);
    }
}
