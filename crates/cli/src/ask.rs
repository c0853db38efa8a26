//! `afnext ask`: a client of a running server or router. Audio files are uploaded in chunks (a progress bar
//! on stderr), then the answer streams to stdout while a second bar follows the encoding of long audio.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use afnext_prompt::{AudioSource, Content, Part, Role};
use afnext_server::pb;
use afnext_server::pb::af_next_client::AfNextClient;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::input::{InputArgs, SamplingArgs};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The server or router, host:port (or http(s)://host:port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub server: String,
    #[command(flatten)]
    pub input: InputArgs,
    /// Most tokens to generate (default: the server's).
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Identifies the conversation, so follow-up turns reach the caches of their first turn.
    #[arg(long, default_value = "")]
    pub session_id: String,
    /// API key (sent as `authorization: Bearer KEY`).
    #[arg(long, env = "AFNEXT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Connect over TLS, verifying the server against this PEM CA.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// A one-line progress bar on stderr (redrawn in place on a terminal, a line per 10% otherwise).
struct Bar {
    what: &'static str,
    tty: bool,
    last: i64,
    on: bool,
}

impl Bar {
    fn new(what: &'static str, on: bool) -> Self {
        Bar {
            what,
            tty: std::io::stderr().is_terminal(),
            last: -1,
            on,
        }
    }
    fn show(&mut self, done: u64, total: u64, unit: &str) {
        if !self.on || total == 0 {
            return;
        }
        let pct = (done * 100 / total) as i64;
        if self.tty {
            let filled = (pct / 4) as usize;
            eprint!(
                "\r{} [{}{}] {done}/{total} {unit}",
                self.what,
                "#".repeat(filled),
                " ".repeat(25 - filled.min(25))
            );
            if done >= total {
                eprintln!();
            }
        } else if pct / 10 != self.last / 10 || done >= total {
            eprintln!("{}: {done}/{total} {unit}", self.what);
        }
        self.last = pct;
    }
}

impl AskArgs {
    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        if let Some(k) = &self.api_key {
            let v: MetadataValue<_> = format!("Bearer {k}")
                .parse()
                .context("the API key is not a valid header value")?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }
}

async fn connect(args: &AskArgs) -> Result<AfNextClient<Channel>> {
    let host = args
        .server
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let tls = args.tls_ca.is_some() || args.server.starts_with("https://");
    let url = format!("{}://{host}", if tls { "https" } else { "http" });
    let mut ep = Channel::from_shared(url.clone())?;
    if tls {
        let mut cfg = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &args.tls_ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            cfg = cfg.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(cfg)?;
    }
    let ch = ep
        .connect()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    Ok(AfNextClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Uploads one file in chunks, showing progress; returns its upload id.
async fn upload(
    c: &mut AfNextClient<Channel>,
    args: &AskArgs,
    data: Vec<u8>,
    hint: Option<&str>,
) -> Result<String> {
    let format = match hint.map(str::to_ascii_lowercase).as_deref() {
        Some("wav") => pb::AudioFormat::Wav,
        Some("flac") => pb::AudioFormat::Flac,
        Some("mp3") => pb::AudioFormat::Mp3,
        Some("ogg") => pb::AudioFormat::Ogg,
        _ => pb::AudioFormat::Unspecified,
    } as i32;
    let total = data.len() as u64;
    let mut bar = Bar::new("uploading", !args.json);
    let chunks: Vec<Vec<u8>> = data.chunks(CHUNK).map(<[u8]>::to_vec).collect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        for chunk in chunks {
            sent += chunk.len() as u64;
            if tx
                .send(pb::UploadAudioRequest { chunk, format })
                .await
                .is_err()
            {
                return;
            }
            bar.show(sent, total, "bytes");
        }
    });
    let r = c
        .upload_audio(args.request(tokio_stream::wrappers::ReceiverStream::new(rx))?)
        .await
        .map_err(|s| anyhow::anyhow!("upload failed: {:?}: {}", s.code(), s.message()))?;
    let _ = sender.await;
    Ok(r.into_inner().upload_id)
}

pub fn run(args: AskArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(ask(args))
}

async fn ask(args: AskArgs) -> Result<()> {
    let conv = args.input.conversation()?;
    let mut c = connect(&args).await?;
    let mut messages = Vec::new();
    for m in &conv.messages {
        let Some(content) = &m.content else { continue };
        let parts = match content {
            Content::Text(t) => vec![Part::Text(t.clone())],
            Content::Parts(p) => p.clone(),
        };
        let mut out = Vec::new();
        for p in parts {
            out.push(pb::Part {
                kind: Some(match p {
                    Part::Text(t) => pb::part::Kind::Text(t),
                    Part::Audio(src) => {
                        let (data, hint) = match src {
                            AudioSource::Path(path) => (
                                std::fs::read(&path)
                                    .with_context(|| format!("reading {}", path.display()))?,
                                path.extension()
                                    .and_then(|e| e.to_str())
                                    .map(str::to_string),
                            ),
                            AudioSource::Bytes { data, format_hint } => {
                                (data.as_ref().clone(), format_hint)
                            }
                        };
                        let id = upload(&mut c, &args, data, hint.as_deref()).await?;
                        pb::part::Kind::Audio(pb::AudioPart {
                            source: Some(pb::audio_part::Source::UploadId(id)),
                            format: 0,
                        })
                    }
                }),
            });
        }
        messages.push(pb::Message {
            role: match m.role {
                Role::System => pb::Role::System,
                Role::User => pb::Role::User,
                Role::Assistant => pb::Role::Assistant,
            } as i32,
            parts: out,
        });
    }
    let s = &args.sampling;
    let req = pb::GenerateRequest {
        messages,
        sampling: Some(pb::SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k as u32,
            top_p: Some(s.top_p),
            repetition_penalty: Some(s.repetition_penalty),
            seed: s.seed,
            min_new_tokens: u32::try_from(s.min_new_tokens).unwrap_or(u32::MAX),
        }),
        max_new_tokens: args.max_new_tokens,
        stop: s.stop.clone(),
        session_id: args.session_id.clone(),
        truncate_audio: args.input.truncate,
        ignore_eos: false,
    };
    let t0 = Instant::now();
    let mut stream = match c.generate(args.request(req)?).await {
        Ok(r) => r.into_inner(),
        Err(st) => bail!("{:?}: {}", st.code(), st.message()),
    };
    let mut bar = Bar::new("encoding windows", !args.json);
    let (mut text, mut ids, mut finished) = (String::new(), Vec::new(), None);
    let mut out = std::io::stdout().lock();
    loop {
        let m = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(st) => {
                if !args.json {
                    let _ = writeln!(out);
                }
                bail!("{:?}: {}", st.code(), st.message())
            }
        };
        match m.event {
            Some(pb::generate_response::Event::Progress(p)) => {
                bar.show(p.windows_done.into(), p.windows_total.into(), "windows")
            }
            Some(pb::generate_response::Event::Delta(d)) => {
                if !args.json {
                    out.write_all(d.text.as_bytes())?;
                    out.flush()?;
                }
                text.push_str(&d.text);
                ids.extend(d.token_ids);
            }
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    let f = finished.context("the stream ended without a finished event")?;
    if args.json {
        let reason = pb::FinishReason::try_from(f.reason)
            .map(|r| r.as_str_name().to_string())
            .unwrap_or_default();
        let u = f.usage.unwrap_or_default();
        let t = f.timings.unwrap_or_default();
        let v = json!({
            "text": text,
            "token_ids": ids,
            "finish_reason": reason,
            "usage": {
                "prompt_tokens": u.prompt_tokens, "audio_tokens": u.audio_tokens,
                "cached_tokens": u.cached_tokens, "completion_tokens": u.completion_tokens,
                "audio_seconds": u.audio_seconds, "audio_cache_hits": u.audio_cache_hits,
            },
            "timings": {
                "prepare_ms": t.prepare_ms, "encode_ms": t.encode_ms, "queue_ms": t.queue_ms,
                "prefill_ms": t.prefill_ms, "time_to_first_token_ms": t.time_to_first_token_ms,
                "total_ms": t.total_ms, "client_total_ms": t0.elapsed().as_secs_f64() * 1e3,
            },
            "session_id": args.session_id,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
