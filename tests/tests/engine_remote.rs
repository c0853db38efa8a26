//! Prepared requests with streamed audio (the decoder side of the cluster): windows pushed out of order and
//! late give the tokens of `Engine::submit`; a follow-up on the same audio needs no windows; bad windows
//! fail the request with a message.

use std::sync::Arc;
use std::time::Duration;

use afnext_audio::{Frontend, Overflow};
use afnext_e2e::{ckpt, fixtures_dir};
use afnext_engine::{
    AudioKey, Engine, EngineConfig, Event, GenerateRequest, PreparedRequest, RemoteAudio,
    RequestHandle,
};
use afnext_model::config::GenerationDefaults;
use afnext_model::{AfNext, SamplingParams};
use afnext_prompt::{AudioSource, Conversation, PromptProcessor};
use candle_core::{DType, Device, Tensor};

fn collect(mut h: RequestHandle) -> Result<(Vec<u32>, usize), String> {
    let (mut ids, mut progress) = (Vec::new(), 0);
    while let Some(ev) = h.blocking_recv() {
        match ev {
            Event::Delta { token_ids, .. } => ids.extend(token_ids),
            Event::EncodeProgress { .. } => progress += 1,
            Event::Finished(_) => return Ok((ids, progress)),
            Event::Failed(e) => return Err(e.to_string()),
            Event::Started { .. } => {}
        }
    }
    Err("no final event".into())
}

struct Prepared {
    req: PreparedRequest,
    /// Per window with tokens: (window index, embeddings).
    windows: Vec<(usize, Tensor)>,
}

/// What the router and an encoder worker compute for a one-audio conversation.
fn prepare(model: &AfNext, proc: &PromptProcessor, conv: &Conversation, bytes: &[u8]) -> Prepared {
    let p = afnext_prompt::prepare(proc, conv, Overflow::Reject).unwrap();
    let a = &p.audios[0];
    let fe = Frontend::new(&proc.config().frontend).unwrap();
    let f = afnext_prompt::prepare::features(&fe, a, 1).unwrap();
    let wl = f.n_mels * f.frames;
    let mut windows = Vec::new();
    for w in f.plan.windows.iter().filter(|w| w.tokens > 0) {
        let x = Tensor::from_vec(
            f.features[w.index * wl..(w.index + 1) * wl].to_vec(),
            (1, f.n_mels, f.frames),
            &Device::Cpu,
        )
        .unwrap();
        let e = model
            .encode_windows(&x, &[w.valid_frames], &[w.index])
            .unwrap()
            .embeddings()
            .unwrap();
        windows.push((w.index, e));
    }
    let req = PreparedRequest {
        prompt_ids: p.prompt.input_ids.clone(),
        audios: vec![RemoteAudio {
            key: AudioKey::of(bytes, false),
            window_tokens: f.plan.windows.iter().map(|w| w.tokens).collect(),
            seconds: a.duration_s(16_000),
        }],
        max_new_tokens: Some(12),
        sampling: SamplingParams::default(),
        stop: vec![],
        ignore_eos: false,
        deadline: None,
        prepare_time: Duration::ZERO,
        span: tracing::Span::none(),
    };
    Prepared { req, windows }
}

#[test]
fn streamed_windows_in_any_order_give_the_tokens_of_submit_and_follow_ups_need_none() {
    let dir = ckpt("tiny-a");
    let model = Arc::new(AfNext::load(&dir, DType::F32, &Device::Cpu).unwrap());
    let proc = Arc::new(PromptProcessor::load(&dir).unwrap());
    let gen = GenerationDefaults::load(&dir, &model.cfg.text).unwrap();
    let e = Engine::start(model.clone(), proc.clone(), gen, EngineConfig::default()).unwrap();
    let bytes = std::fs::read(fixtures_dir().join("audio/mix_75s.flac")).unwrap();
    let conv = Conversation::single_turn(
        None,
        Some(AudioSource::Bytes {
            data: Arc::new(bytes.clone()),
            format_hint: None,
        }),
        "What is happening here?",
    );
    let want = collect(
        e.submit(GenerateRequest {
            conversation: conv.clone(),
            max_new_tokens: Some(12),
            sampling: SamplingParams::default(),
            stop: vec![],
            truncate_audio: false,
            ignore_eos: false,
            deadline: None,
        })
        .unwrap(),
    )
    .unwrap()
    .0;
    // A second engine, so nothing is cached.
    let gen = GenerationDefaults::load(&dir, &model.cfg.text).unwrap();
    let e = Engine::start(model.clone(), proc.clone(), gen, EngineConfig::default()).unwrap();
    let p = prepare(&model, &proc, &conv, &bytes);
    assert!(p.windows.len() >= 3, "a multi-window clip");
    let acc = e.submit_prepared(p.req.clone()).unwrap();
    assert_eq!(acc.needed, vec![true]);
    let id = acc.handle.id;
    // Last window first, with a pause so the text before the audio is prefilled meanwhile.
    for (w, rows) in p.windows.iter().rev() {
        std::thread::sleep(Duration::from_millis(30));
        e.push_window(id, 0, *w, rows.clone()).unwrap();
        // A retried window is ignored.
        e.push_window(id, 0, *w, rows.clone()).unwrap();
    }
    let (got, progress) = collect(acc.handle).unwrap();
    assert_eq!(got, want);
    assert_eq!(progress, p.windows.len());
    // The follow-up turn: the audio is in the decoder's embedding cache; no window is needed.
    let acc = e.submit_prepared(p.req.clone()).unwrap();
    assert_eq!(acc.needed, vec![false]);
    assert_eq!(collect(acc.handle).unwrap().0, want);

    // Wrong sizes are named.
    let acc = e
        .submit_prepared(PreparedRequest {
            audios: vec![RemoteAudio {
                key: AudioKey::of(b"other", false),
                ..p.req.audios[0].clone()
            }],
            ..p.req.clone()
        })
        .unwrap();
    let (w, rows) = &p.windows[0];
    e.push_window(acc.handle.id, 0, *w, rows.narrow(0, 0, 5).unwrap())
        .unwrap();
    let err = collect(acc.handle).unwrap_err();
    assert!(err.contains("came with 5 rows"), "{err}");
    let mut bad = p.req.clone();
    bad.audios[0].window_tokens[0] += 1;
    let err = e.submit_prepared(bad).unwrap_err().to_string();
    assert!(err.contains("audio positions"), "{err}");
}
