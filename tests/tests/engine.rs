//! The serving engine on the tiny checkpoints: batching does not change answers, cancellation frees blocks,
//! follow-up turns reuse the embedding and prefix caches, and preemption under a tiny KV cache resumes
//! exactly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use afnext_e2e::{
    ckpt, fixtures_dir, get, lone_logits, max_tensor_diff, model_reference, test_device, top2_gap,
};
use afnext_engine::{
    Engine, EngineConfig, EngineError, Event, GenerateRequest, SchedulerConfig, Summary,
};
use afnext_model::config::GenerationDefaults;
use afnext_model::{AfNext, FinishReason, SamplingParams};
use afnext_prompt::{AudioSource, Conversation, PromptProcessor};
use candle_core::{DType, Tensor};

fn engine(ck: &str, cfg: EngineConfig) -> Engine {
    engine_in(ck, cfg, DType::F32)
}

fn engine_in(ck: &str, cfg: EngineConfig, dtype: DType) -> Engine {
    let dir = ckpt(ck);
    let model = AfNext::load(&dir, dtype, &test_device()).unwrap();
    let gen = GenerationDefaults::load(&dir, &model.cfg.text).unwrap();
    let proc = PromptProcessor::load(&dir).unwrap();
    Engine::start(Arc::new(model), Arc::new(proc), gen, cfg).unwrap()
}

fn audio(name: &str) -> AudioSource {
    let data = std::fs::read(fixtures_dir().join("audio").join(name)).unwrap();
    AudioSource::Bytes {
        data: Arc::new(data),
        format_hint: None,
    }
}

fn request(conv: Conversation, max_new: usize, rp: f32) -> GenerateRequest {
    GenerateRequest {
        conversation: conv,
        max_new_tokens: Some(max_new),
        sampling: SamplingParams {
            repetition_penalty: rp,
            ..SamplingParams::default()
        },
        stop: vec![],
        truncate_audio: false,
        ignore_eos: false,
        deadline: None,
    }
}

/// 16 different requests: several clips (one 75 s, one exactly over a window boundary), text only, multi-turn,
/// repetition penalty on some.
fn sixteen() -> Vec<GenerateRequest> {
    let clips = [
        "speech_7s.flac",
        "speech_40s.flac",
        "mix_75s.flac",
        "edge_30_01s.flac",
        "stereo_44k_7s.mp3",
    ];
    let prompts = [
        "Transcribe the audio.",
        "What is happening here?",
        "Describe the sound in detail.",
    ];
    (0..16)
        .map(|i| {
            let conv = if i % 8 == 7 {
                Conversation::single_turn(Some("You are terse."), None, prompts[i % 3])
            } else {
                Conversation::single_turn(None, Some(audio(clips[i % clips.len()])), prompts[i % 3])
            };
            request(conv, 12 + i % 5 * 4, if i % 3 == 0 { 1.2 } else { 1.0 })
        })
        .collect()
}

struct Outcome {
    ids: Vec<u32>,
    text: String,
    summary: Summary,
    progress: usize,
}

fn collect(mut h: afnext_engine::RequestHandle) -> Result<Outcome, EngineError> {
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut progress = 0;
    while let Some(ev) = h.blocking_recv() {
        match ev {
            Event::EncodeProgress { .. } => progress += 1,
            Event::Started { .. } => {}
            Event::Delta { text: t, token_ids } => {
                ids.extend(token_ids);
                text.push_str(&t);
            }
            Event::Finished(summary) => {
                return Ok(Outcome {
                    ids,
                    text,
                    summary,
                    progress,
                })
            }
            Event::Failed(e) => return Err(e),
        }
    }
    panic!("the event stream ended without Finished or Failed");
}

fn wait_idle(e: &Engine) {
    let end = Instant::now() + Duration::from_secs(10);
    while e.stats().in_flight > 0 || e.stats().running > 0 {
        assert!(
            Instant::now() < end,
            "engine did not become idle: {:?}",
            e.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sixteen_concurrent_requests_match_each_request_run_alone() {
    let e = engine("tiny-a", EngineConfig::default());
    let reqs = sixteen();
    let alone: Vec<Outcome> = reqs
        .iter()
        .map(|r| collect(e.submit(r.clone()).unwrap()).unwrap())
        .collect();
    wait_idle(&e);
    let handles: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let together: Vec<Outcome> = handles.into_iter().map(|h| collect(h).unwrap()).collect();
    wait_idle(&e);
    let s = e.stats();
    assert_eq!(s.kv.used, 0, "blocks leaked: {s:?}");
    let model = AfNext::load(&ckpt("tiny-a"), DType::F32, &test_device()).unwrap();
    let proc = PromptProcessor::load(&ckpt("tiny-a")).unwrap();
    let mut divergences = 0;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        if a.ids == t.ids {
            assert_eq!(a.text, t.text);
            continue;
        }
        // Batching may only change a token where the top two logits are within 1e-4.
        let k = a.ids.iter().zip(&t.ids).take_while(|(x, y)| x == y).count();
        let l = lone_logits(&model, &proc, &reqs[i].conversation, &a.ids[..k]);
        let gap = top2_gap(&l);
        assert!(
            gap <= 1e-4,
            "request {i}: batched and lone runs differ at token {k} where the top-2 gap is {gap}"
        );
        divergences += 1;
    }
    eprintln!("16 concurrent requests: {divergences} diverged at a near-tie");
    // The follow-up statistics: identical audio in the concurrent pass came from the embedding cache.
    assert!(together
        .iter()
        .all(|o| o.progress == 0 || o.summary.usage.audio_cache_hits == 0));
}

/// bf16 (AMX tiles where the CPU has them, the f32 kernel otherwise): batching still changes nothing, because
/// every row is computed by the same instruction sequence whatever the batch. tiny-c has a GQA group of 8 and a
/// head_dim of 8 (the paged decode kernels' widest group).
#[test]
fn bf16_batched_requests_equal_their_lone_runs() {
    for ck in ["tiny-b", "tiny-c"] {
        let e = engine_in(ck, EngineConfig::default(), DType::BF16);
        let reqs: Vec<GenerateRequest> = sixteen().into_iter().step_by(2).collect();
        let alone: Vec<Vec<u32>> = reqs
            .iter()
            .map(|r| collect(e.submit(r.clone()).unwrap()).unwrap().ids)
            .collect();
        let handles: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        for (h, want) in handles.into_iter().zip(&alone) {
            assert_eq!(&collect(h).unwrap().ids, want, "{ck}");
        }
        wait_idle(&e);
        assert_eq!(e.stats().kv.used, 0, "{ck}");
    }
}

#[test]
fn batched_engine_matches_the_single_sequence_generator() {
    for ck in ["tiny-b", "tiny-c"] {
        let e = engine(ck, EngineConfig::default());
        let dir = ckpt(ck);
        let model = AfNext::load(&dir, DType::F32, &test_device()).unwrap();
        let proc = PromptProcessor::load(&dir).unwrap();
        let gen = GenerationDefaults::load(&dir, &model.cfg.text).unwrap();
        let conv = Conversation::single_turn(
            None,
            Some(audio("speech_40s.flac")),
            "Transcribe the audio.",
        );
        let out = collect(e.submit(request(conv.clone(), 20, 1.0)).unwrap()).unwrap();
        // Re-derive each token with the lone path: greedy means argmax of its logits (or a near-tie).
        for k in 0..out.ids.len() {
            let l = lone_logits(&model, &proc, &conv, &out.ids[..k]);
            let best = afnext_model::sampling::argmax(&l);
            if best != out.ids[k] {
                assert!(
                    top2_gap(&l) <= 1e-4,
                    "{ck} token {k}: engine {} lone {best}",
                    out.ids[k]
                );
            }
            assert!(!gen.eos_token_ids.contains(&out.ids[k]));
        }
    }
}

#[test]
fn cancelling_a_stream_frees_its_blocks() {
    let e = engine("tiny-a", EngineConfig::default());
    let mut req = request(
        Conversation::single_turn(None, Some(audio("speech_40s.flac")), "Describe."),
        2000,
        1.0,
    );
    // No eos: the request would run for 2000 tokens.
    req.ignore_eos = true;
    let e = Arc::new(e);
    let mut h = e.submit(req).unwrap();
    let mut deltas = 0;
    while deltas < 3 {
        match h.blocking_recv().unwrap() {
            Event::Delta { .. } => deltas += 1,
            Event::Finished(s) => panic!("finished before it could be cancelled: {s:?}"),
            Event::Failed(err) => panic!("{err}"),
            _ => {}
        }
    }
    assert!(e.stats().kv.used > 0, "a running request holds blocks");
    drop(h);
    let end = Instant::now() + Duration::from_secs(10);
    while e.stats().kv.used > 0 {
        assert!(
            Instant::now() < end,
            "blocks were not freed: {:?}",
            e.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(e.stats().running, 0);
}

#[test]
fn a_follow_up_turn_reuses_the_audio_embeddings_and_the_prefix() {
    let e = engine("tiny-a", EngineConfig::default());
    let first = Conversation::single_turn(
        None,
        Some(audio("speech_40s.flac")),
        "Transcribe the audio.",
    );
    let a = collect(e.submit(request(first.clone(), 8, 1.0)).unwrap()).unwrap();
    assert!(a.progress > 0, "the first turn runs the encoder");
    assert_eq!(a.summary.usage.cached_tokens, 0);
    let windows = e.stats().windows_encoded;
    // The follow-up: the same audio, the first answer, a new question.
    let mut follow = first.clone();
    follow.messages.push(afnext_prompt::Message {
        role: afnext_prompt::Role::Assistant,
        content: Some(afnext_prompt::Content::Text(a.text.clone())),
    });
    follow.messages.push(afnext_prompt::Message {
        role: afnext_prompt::Role::User,
        content: Some(afnext_prompt::Content::Text("And the speaker?".into())),
    });
    let b = collect(e.submit(request(follow, 8, 1.0)).unwrap()).unwrap();
    assert_eq!(e.stats().windows_encoded, windows, "the encoder ran again");
    assert_eq!(b.progress, 0);
    assert_eq!(b.summary.usage.audio_cache_hits, 1);
    // Nothing of the first turn's prompt is computed again: its whole blocks are found, and the positions
    // of the block it left partial (the prompt's end and the answer's start) are copied. (Its last token,
    // the newline after `assistant`, may merge with the start of the answer in the follow-up's text.)
    let shared = a.summary.usage.prompt_tokens - 1;
    assert!(
        b.summary.usage.cached_tokens >= shared,
        "cached {} < {shared}",
        b.summary.usage.cached_tokens
    );
    assert!(e.stats().kv.partial_hits > 0);
}

#[test]
fn a_prompt_sharing_part_of_a_cached_block_copies_its_rows_and_answers_as_alone() {
    let e = engine("tiny-a", EngineConfig::default());
    let bs = e.config().block_size;
    let proc = PromptProcessor::load(&ckpt("tiny-a")).unwrap();
    let conv = |q: &str| Conversation::single_turn(Some("You are terse."), None, q);
    let first =
        conv("Describe a quiet morning by the sea, then name three sounds you would hear there.");
    let second = conv("Describe a quiet morning in a small town.");
    let ids = |c: &Conversation| proc.encode(c, &[]).unwrap().input_ids;
    let (a_ids, b_ids) = (ids(&first), ids(&second));
    let shared = a_ids.iter().zip(&b_ids).take_while(|(x, y)| x == y).count();
    // The case this test is for: the prompts part inside a block that the first one fills.
    assert!(
        shared % bs != 0,
        "shared {shared} is a whole number of blocks"
    );
    assert!(a_ids.len() >= shared.div_ceil(bs) * bs && shared < b_ids.len() - 1);
    let a = collect(e.submit(request(first, 4, 1.0)).unwrap()).unwrap();
    assert_eq!(a.summary.usage.cached_tokens, 0);
    let before = e.stats().kv;
    let b = collect(e.submit(request(second.clone(), 12, 1.2)).unwrap()).unwrap();
    assert_eq!(
        b.summary.usage.cached_tokens, shared,
        "whole blocks and the rows copied from the block where the prompts part"
    );
    let after = e.stats().kv;
    assert_eq!(after.partial_hits, before.partial_hits + 1);
    assert_eq!(
        after.partial_positions - before.partial_positions,
        (shared % bs) as u64
    );
    wait_idle(&e);
    assert_eq!(e.stats().kv.used, 0, "blocks leaked");
    // The same request on a fresh engine computes every position itself: the same tokens.
    let fresh = engine("tiny-a", EngineConfig::default());
    let alone = collect(fresh.submit(request(second, 12, 1.2)).unwrap()).unwrap();
    assert_eq!(alone.summary.usage.cached_tokens, 0);
    assert_eq!(b.ids, alone.ids);
}

#[test]
fn preemption_under_a_tiny_kv_cache_gives_identical_tokens() {
    // Six requests without the 75 s clip (2 000 positions alone would not fit the tight cache below).
    let reqs: Vec<GenerateRequest> = sixteen()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 5 != 2)
        .map(|(_, r)| r)
        .take(6)
        .collect();
    let roomy = engine("tiny-a", EngineConfig::default());
    let expected: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| collect(roomy.submit(r.clone()).unwrap()).unwrap().ids)
        .collect();
    // The tiny-a KV cache: 2 layers x 2 x 2 kv heads x 16 dims x 4 bytes = 512 bytes per position.
    // 1400 positions: each request fits alone, six together do not.
    let cfg = EngineConfig {
        kv_cache_bytes: 1400 * 512,
        scheduler: SchedulerConfig {
            max_batch_tokens: 256,
            max_running: 6,
            max_waiting: 64,
            prefill_chunk: 128,
        },
        ..EngineConfig::default()
    };
    let tight = engine("tiny-a", cfg);
    let handles: Vec<_> = reqs.iter().map(|r| tight.submit(r.clone())).collect();
    let mut preempted = 0;
    for (h, want) in handles.into_iter().zip(&expected) {
        match h {
            Ok(h) => {
                let o = collect(h).unwrap();
                preempted += o.summary.preemptions;
                assert_eq!(&o.ids, want);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(preempted > 0, "the tight cache must force preemption");
    wait_idle(&tight);
    assert_eq!(tight.stats().kv.used, 0);
}

#[test]
fn deadlines_and_queue_limits() {
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 64,
            max_running: 1,
            max_waiting: 1,
            prefill_chunk: 64,
        },
        ..EngineConfig::default()
    };
    let e = engine("tiny-a", cfg);
    let conv = Conversation::single_turn(None, None, "Hello there.");
    let long = || GenerateRequest {
        ignore_eos: true,
        ..request(conv.clone(), 2000, 1.0)
    };
    let a = e.submit(long()).unwrap();
    let b = e.submit(long()).unwrap();
    match e.submit(request(conv.clone(), 5, 1.0)) {
        Err(EngineError::QueueFull { limit: 2 }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    drop((a, b));
    wait_idle(&e);
    let mut r = long();
    r.deadline = Some(Instant::now() + Duration::from_millis(50));
    match collect(e.submit(r).unwrap()) {
        Err(EngineError::DeadlineExceeded) => {}
        other => panic!(
            "expected DeadlineExceeded, got {:?}",
            other.map(|o| o.summary)
        ),
    }
    wait_idle(&e);
    assert_eq!(e.stats().kv.used, 0);
}

/// Hidden states of `emb` `[n, hidden]` prefilled through the contiguous single-sequence cache (the paged
/// path's reference).
fn contiguous_hidden(model: &AfNext, emb: &Tensor) -> Tensor {
    let mut cache = model.new_cache();
    model
        .prefill(&emb.unsqueeze(0).unwrap(), &mut cache, 4096, true)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// The paged path with attention blocks of 7 query rows, scattered blocks, a prompt split
/// over two steps and two sequences in one step, against the contiguous single-sequence cache.
#[test]
fn paged_attention_in_attn_blocks_matches_the_contiguous_cache() {
    use afnext_model::paged::{PagedKv, SeqStep};
    let model = AfNext::load(&ckpt("tiny-b"), DType::F32, &test_device()).unwrap();
    let v = model.cfg.text.vocab_size as u32;
    let ids: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % v).collect();
    let emb = model.decoder.embed_rows(&ids).unwrap();
    let want = contiguous_hidden(&model, &emb);
    let kv = PagedKv::new(&model.cfg.text, 64, 4, DType::F32, &test_device())
        .unwrap()
        .with_attn_block(7);
    // Sequence A uses blocks 63, 61, 59, ... ; sequence B (the same tokens) blocks 0, 2, 4, ...
    let table_a: Vec<u32> = (0..25).map(|i| 63 - 2 * i).collect();
    let table_b: Vec<u32> = (0..25).map(|i| 2 * i).collect();
    let step = |seqs: &[SeqStep], rows: &[Tensor]| {
        model
            .decoder
            .forward_paged(&Tensor::cat(rows, 0).unwrap(), seqs, &kv)
            .unwrap()
    };
    let s = |start, len, t: &Vec<u32>| SeqStep {
        start,
        len,
        block_table: t.clone(),
    };
    let h1 = step(
        &[s(0, 37, &table_a), s(0, 10, &table_b)],
        &[emb.narrow(0, 0, 37).unwrap(), emb.narrow(0, 0, 10).unwrap()],
    );
    let h2 = step(
        &[s(10, 90, &table_b), s(37, 63, &table_a)],
        &[
            emb.narrow(0, 10, 90).unwrap(),
            emb.narrow(0, 37, 63).unwrap(),
        ],
    );
    let got_a = Tensor::cat(
        &[h1.narrow(0, 0, 37).unwrap(), h2.narrow(0, 90, 63).unwrap()],
        0,
    )
    .unwrap();
    let got_b = Tensor::cat(
        &[h1.narrow(0, 37, 10).unwrap(), h2.narrow(0, 0, 90).unwrap()],
        0,
    )
    .unwrap();
    for got in [got_a, got_b] {
        let d = max_tensor_diff(&got, &want);
        assert!(d < 1e-5, "paged hidden states differ by {d}");
    }
}

/// Decode steps attended for all sequences at once (padded gather, the GPU's default) against the
/// per-sequence path, with sequences of different lengths in scattered blocks.
#[test]
fn batched_decode_attention_matches_per_sequence_attention() {
    use afnext_model::paged::{PagedKv, SeqStep};
    for ck in ["tiny-a", "tiny-b"] {
        let model = AfNext::load(&ckpt(ck), DType::F32, &test_device()).unwrap();
        let v = model.cfg.text.vocab_size as u32;
        let pool = |batched: usize| {
            PagedKv::new(&model.cfg.text, 64, 4, DType::F32, &test_device())
                .unwrap()
                .with_decode_batch_keys(batched)
        };
        let (per_seq, batched) = (pool(0), pool(1 << 20));
        let tables: [Vec<u32>; 3] = [
            (0..10).map(|i| 63 - 3 * i).collect(),
            (0..10).map(|i| 2 * i).collect(),
            (0..10).map(|i| 2 * i + 1).collect(),
        ];
        let lens = [30usize, 17, 5];
        let rows = |n: usize, salt: u32| {
            let ids: Vec<u32> = (0..n as u32).map(|i| (i * 31 + salt) % v).collect();
            model.decoder.embed_rows(&ids).unwrap()
        };
        let prompt: Vec<SeqStep> = (0..3)
            .map(|i| SeqStep {
                start: 0,
                len: lens[i],
                block_table: tables[i].clone(),
            })
            .collect();
        let x = Tensor::cat(&[rows(30, 1), rows(17, 2), rows(5, 3)], 0).unwrap();
        for kv in [&per_seq, &batched] {
            model.decoder.forward_paged(&x, &prompt, kv).unwrap();
        }
        for step in 0..3 {
            let seqs: Vec<SeqStep> = (0..3)
                .map(|i| SeqStep {
                    start: lens[i] + step,
                    len: 1,
                    block_table: tables[i].clone(),
                })
                .collect();
            let x = rows(3, 7 + step as u32);
            let a = model.decoder.forward_paged(&x, &seqs, &per_seq).unwrap();
            let b = model.decoder.forward_paged(&x, &seqs, &batched).unwrap();
            let d = max_tensor_diff(&a, &b);
            eprintln!("{ck} step {step}: batched decode differs by {d:.2e}");
            assert!(d < 1e-5, "{ck} step {step}: batched decode differs by {d}");
        }
    }
}

/// A long step into consecutive blocks writes the cache with one copy per run of slots (not the scatter
/// kernel), and attends in many small query blocks: the hidden states are the contiguous cache's.
#[test]
fn long_steps_write_runs_of_slots_and_attend_in_blocks() {
    use afnext_model::paged::{PagedKv, SeqStep};
    let model = AfNext::load(&ckpt("tiny-a"), DType::F32, &test_device()).unwrap();
    let v = model.cfg.text.vocab_size as u32;
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 13 + 5) % v).collect();
    let emb = model.decoder.embed_rows(&ids).unwrap();
    let want = contiguous_hidden(&model, &emb);
    let kv = PagedKv::new(&model.cfg.text, 64, 4, DType::F32, &test_device())
        .unwrap()
        .with_attn_block(16);
    // Blocks 10..30 and then 40..60: two runs of consecutive slots for the first step.
    let mut table: Vec<u32> = (10..30).collect();
    table.extend(40..60);
    let step = |start: usize, len: usize| {
        model
            .decoder
            .forward_paged(
                &emb.narrow(0, start, len).unwrap(),
                &[SeqStep {
                    start,
                    len,
                    block_table: table.clone(),
                }],
                &kv,
            )
            .unwrap()
    };
    let got = Tensor::cat(&[step(0, 100), step(100, 50)], 0).unwrap();
    let d = max_tensor_diff(&got, &want);
    eprintln!("runs + blocks: hidden states differ by {d:.2e}");
    assert!(d < 1e-5, "hidden states differ by {d}");
}

/// The conversation of the fixtures' `speech_40s` case.
fn speech_40s() -> Conversation {
    Conversation::single_turn(
        None,
        Some(audio("speech_40s.flac")),
        "What is said after thirty seconds?",
    )
}

/// `speech_40s` as the reference generated it (`generate(max_new_tokens=16, min_new_tokens=16)`, greedy),
/// with repetition penalty `rp`.
fn as_reference_40s(rp: f32) -> GenerateRequest {
    let mut r = request(speech_40s(), 16, rp);
    r.sampling.min_new_tokens = 16;
    r
}

/// Two requests at once through the engine (paged cache, batched decode rows) on tiny-e, whose head sizes (24
/// and 20) and FFN (67) are no multiples of the vector width: each gives transformers' 16 greedy ids, without
/// and with repetition penalty 1.2 (`min_new_tokens = 16`, as the reference).
#[test]
fn head_sizes_off_the_vector_width_match_transformers_batched() {
    let e = engine("tiny-e", EngineConfig::default());
    let refs = model_reference("tiny-e", "speech_40s").unwrap();
    let handles: Vec<_> = [(1.0, "gen_greedy_ids"), (1.2, "gen_greedy_ids_rp12")]
        .into_iter()
        .map(|(rp, key)| (e.submit(as_reference_40s(rp)).unwrap(), key))
        .collect();
    for (h, key) in handles {
        let want = get(&refs, key).unwrap().ids().unwrap();
        assert_eq!(collect(h).unwrap().ids, want, "{key}");
    }
    wait_idle(&e);
    assert_eq!(e.stats().kv.used, 0);
}

/// `min_new_tokens` through the engine. On tiny-d's 40 s clip an end-of-sequence id is the greedy argmax
/// before step 16 (tests/model_golden.rs): masked for 16 steps, the engine gives transformers' ids
/// (`generate(max_new_tokens=16, min_new_tokens=16)`, the fixture); unmasked, it stops there, after a prefix
/// of them. A minimum over the maximum is refused, naming both.
#[test]
fn min_new_tokens_masks_eos_as_transformers_does() {
    let e = engine("tiny-d", EngineConfig::default());
    let refs = model_reference("tiny-d", "speech_40s").unwrap();
    let want = get(&refs, "gen_greedy_ids").unwrap().ids().unwrap();
    let out = collect(e.submit(as_reference_40s(1.0)).unwrap()).unwrap();
    assert_eq!(out.ids, want);
    assert_eq!(out.summary.finish_reason, FinishReason::Length);
    let free = collect(e.submit(request(speech_40s(), 16, 1.0)).unwrap()).unwrap();
    assert_eq!(free.summary.finish_reason, FinishReason::Eos);
    assert!(free.ids.len() < 16);
    assert_eq!(free.ids[..], want[..free.ids.len()]);

    let mut bad = request(speech_40s(), 4, 1.0);
    bad.sampling.min_new_tokens = 5;
    match e.submit(bad) {
        Err(EngineError::InvalidRequest(m)) => {
            assert!(
                m.contains("min_new_tokens (5)") && m.contains("max_new_tokens (4)"),
                "{m}"
            )
        }
        Err(other) => panic!("expected InvalidRequest, got {other}"),
        Ok(_) => panic!("min_new_tokens over max_new_tokens was accepted"),
    }
    wait_idle(&e);
    assert_eq!(e.stats().kv.used, 0);
}
