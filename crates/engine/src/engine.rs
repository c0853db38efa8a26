//! The engine's public face: configuration, requests, events, and request preparation.
//!
//! A request flows through three stages, each on its own thread so that none stalls the others:
//! 1. [`Engine::submit`] (the caller's thread; the server runs it on a blocking pool): checks parameters and
//!    capacity, looks every audio up in the embedding cache, decodes and computes log-mel features for the
//!    misses, tokenizes the prompt and checks its length. Every bad input is refused here, before a stream
//!    starts.
//! 2. The encoder thread ([`crate::encoder`]) runs the encoder, RoTE and projector on the windows of the
//!    misses (progress events per batch) and fills the embedding cache.
//! 3. The step loop ([`crate::worker`]) runs continuous batching over the paged KV cache and streams tokens.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use afnext_audio::{Frontend, Overflow};
use afnext_model::config::GenerationDefaults;
use afnext_model::paged::PagedKv;
use afnext_model::{AfNext, FinishReason, SamplingParams};
use afnext_prompt::{AudioSource, Conversation, PromptProcessor};
use tokio::sync::mpsc;

use crate::block::{BlockManager, BlockStats};
use crate::cache::{AudioEmbeds, AudioKey, CacheStats, EmbeddingCache};
use crate::error::{EngineError, Result};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::worker::Command;

/// Engine settings; the CLI composes them from flags.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Positions per KV block.
    pub block_size: usize,
    /// Memory for the paged KV cache (all layers, keys and values).
    pub kv_cache_bytes: usize,
    /// Memory for cached audio embeddings.
    pub embedding_cache_bytes: usize,
    /// Windows per encoder forward (bounds the encoder's attention memory).
    pub encoder_batch: usize,
    /// Largest `max_new_tokens` a request may ask for (`None`: the checkpoint's `generation_config.json`).
    pub max_new_tokens_limit: Option<usize>,
    /// Largest prompt in tokens (`None`: the model's `max_position_embeddings`).
    pub max_prompt_tokens: Option<usize>,
    /// Threads for the log-mel front end of one audio.
    pub frontend_threads: usize,
    /// Prepared requests (cluster) prefill each audio window as it arrives; off: only once all arrived
    /// (encode everything first; kept to measure what streaming saves).
    pub streaming_prefill: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            scheduler: SchedulerConfig::default(),
            block_size: 16,
            kv_cache_bytes: 2 << 30,
            embedding_cache_bytes: 512 << 20,
            encoder_batch: 4,
            max_new_tokens_limit: None,
            max_prompt_tokens: None,
            frontend_threads: 1,
            streaming_prefill: true,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub conversation: Conversation,
    /// `None`: the checkpoint's default (capped by the limit).
    pub max_new_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep the first `max_audio_len` seconds of longer audio instead of refusing it.
    pub truncate_audio: bool,
    /// Generate until `max_new_tokens` or a stop string even if an end-of-sequence id comes first (benchmarks,
    /// tests on random weights). The eos id is then part of the output.
    pub ignore_eos: bool,
    pub deadline: Option<Instant>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub audio_tokens: usize,
    /// Prompt positions taken from the prefix cache instead of computed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub audio_seconds: f64,
    /// Audio parts served from the embedding cache (the encoder did not run for them).
    pub audio_cache_hits: usize,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Decoding, front end and tokenization in `submit`.
    pub prepare: Duration,
    /// Encoder, RoTE and projector (0 when every audio was cached).
    pub encode: Duration,
    /// From the end of encoding to admission by the scheduler.
    pub queue: Duration,
    /// From admission to the first token.
    pub prefill: Duration,
    /// From `submit` to the first token.
    pub time_to_first_token: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// Times the request was preempted and recomputed.
    pub preemptions: u32,
}

/// What a request streams back, in order: progress while encoding, `Started`, deltas, then exactly one of
/// `Finished` or `Failed`.
#[derive(Debug)]
pub enum Event {
    EncodeProgress {
        windows_done: usize,
        windows_total: usize,
    },
    Started {
        prompt_tokens: usize,
        audio_tokens: usize,
        cached_tokens: usize,
    },
    /// One generated token and the text it completed ("" while a character or a possible stop string is
    /// incomplete).
    Delta {
        text: String,
        token_ids: Vec<u32>,
    },
    Finished(Summary),
    Failed(EngineError),
}

/// Engine-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Requests accepted and not yet finished (preparing, encoding, queued or running).
    pub in_flight: usize,
    pub kv: BlockStats,
    pub block_size: usize,
    pub preemptions: u64,
    pub embeddings: CacheStats,
    /// Windows encoded for this engine's requests: by its encoder thread, or pushed by encoder workers.
    pub windows_encoded: u64,
    pub tokens_generated: u64,
    pub requests_finished: u64,
    pub steps: u64,
    /// Seconds of audio in accepted requests.
    pub audio_seconds: f64,
}

/// The caller's end of a request. Dropping it cancels the request (its KV blocks are freed at the next step).
#[derive(Debug)]
pub struct RequestHandle {
    pub id: u64,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) loop_tx: std_mpsc::Sender<Command>,
}

impl RequestHandle {
    /// The next event; `None` after the final one.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
    pub fn cancel(&self) {
        if !self.cancel.swap(true, Ordering::SeqCst) {
            let _ = self.loop_tx.send(Command::Wake);
        }
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Counts a request as in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub stats: Mutex<EngineStats>,
    pub cache: Mutex<Option<EmbeddingCache>>,
    pub in_flight: AtomicUsize,
    pub accepting: AtomicBool,
    /// Set when the grace period is over: whatever is left fails with `ShuttingDown`.
    pub stopping: AtomicBool,
    pub next_id: AtomicU64,
    pub windows_encoded: AtomicU64,
    /// Why the tensor-parallel group failed, once it has.
    pub lost: Mutex<Option<String>>,
}

impl Shared {
    pub fn lose_group(&self, reason: &str) {
        self.accepting.store(false, Ordering::SeqCst);
        let mut l = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        l.get_or_insert_with(|| reason.to_string());
    }

    pub fn group_lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn cache<T>(&self, f: impl FnOnce(&mut EmbeddingCache) -> T) -> T {
        let mut g = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        f(g.as_mut().expect("cache is set at start"))
    }
}

/// One audio part after preparation.
#[derive(Debug)]
pub(crate) enum AudioInput {
    Cached(Arc<AudioEmbeds>),
    Pending {
        key: AudioKey,
        features: afnext_audio::AudioFeatures,
        seconds: f64,
    },
}

/// A prepared request on its way to the encoder thread and the step loop.
#[derive(Debug)]
pub(crate) struct Job {
    pub id: u64,
    pub prompt_ids: Vec<u32>,
    /// Prefix-cache identity of every prompt position.
    pub keys: Vec<u64>,
    pub audios: Vec<AudioInput>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub deadline: Option<Instant>,
    pub usage: Usage,
    pub submitted: Instant,
    pub prepare_time: Duration,
    pub encode_time: Duration,
    pub tx: mpsc::UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
    /// Held for its `Drop`: the request counts as in flight until the job is gone.
    pub _in_flight: InFlight,
    /// The request's trace span (steps computing it are children of, or linked to, it).
    pub span: tracing::Span,
}

impl Job {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

/// The serving engine of one model.
pub struct Engine {
    pub(crate) model: Arc<AfNext>,
    pub(crate) proc: Arc<PromptProcessor>,
    frontend: Frontend,
    cfg: EngineConfig,
    gen: GenerationDefaults,
    pub(crate) shared: Arc<Shared>,
    enc_tx: Mutex<Option<std_mpsc::Sender<Job>>>,
    pub(crate) loop_tx: std_mpsc::Sender<Command>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    kv_blocks: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Allocates the KV pool and starts the encoder thread and the step loop.
    pub fn start(
        model: Arc<AfNext>,
        proc: Arc<PromptProcessor>,
        gen: GenerationDefaults,
        cfg: EngineConfig,
    ) -> Result<Self> {
        cfg.scheduler
            .validate()
            .map_err(EngineError::InvalidRequest)?;
        let per_block = PagedKv::bytes_per_block(
            model.decoder.local_config(),
            cfg.block_size.max(1),
            model.dtype(),
        );
        let blocks = cfg.kv_cache_bytes / per_block.max(1);
        if cfg.block_size == 0 || blocks == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "the KV cache budget of {} bytes holds no block of {} positions ({per_block} bytes each)",
                cfg.kv_cache_bytes, cfg.block_size
            )));
        }
        // In a tensor-parallel group each rank caches its own kv heads; block ids are the same everywhere.
        let kv = PagedKv::new(
            model.decoder.local_config(),
            blocks,
            cfg.block_size,
            model.dtype(),
            model.device(),
        )?;
        let frontend = Frontend::new(&proc.config().frontend)
            .map_err(|e| EngineError::Internal(format!("front end: {e}")))?;
        let shared = Arc::new(Shared::default());
        *shared.cache.lock().expect("fresh lock") =
            Some(EmbeddingCache::new(cfg.embedding_cache_bytes));
        shared.accepting.store(true, Ordering::SeqCst);
        let sched = Scheduler::new(
            cfg.scheduler.clone(),
            BlockManager::new(blocks, cfg.block_size),
        );
        let (loop_tx, loop_rx) = std_mpsc::channel();
        let (enc_tx, enc_rx) = std_mpsc::channel();
        let worker = crate::worker::Worker::new(
            model.clone(),
            proc.clone(),
            gen.eos_token_ids.clone(),
            sched,
            kv,
            shared.clone(),
        )
        .streaming_prefill(cfg.streaming_prefill);
        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name("afnext-steps".into())
                .spawn(move || worker.run(loop_rx))
                .map_err(|e| EngineError::Internal(format!("cannot start the step loop: {e}")))?,
        );
        let enc = crate::encoder::EncoderThread {
            model: model.clone(),
            shared: shared.clone(),
            batch: cfg.encoder_batch.max(1),
            loop_tx: loop_tx.clone(),
        };
        threads.push(
            std::thread::Builder::new()
                .name("afnext-encoder".into())
                .spawn(move || enc.run(enc_rx))
                .map_err(|e| EngineError::Internal(format!("cannot start the encoder: {e}")))?,
        );
        Ok(Engine {
            model,
            proc,
            frontend,
            cfg,
            gen,
            shared,
            enc_tx: Mutex::new(Some(enc_tx)),
            loop_tx,
            threads: Mutex::new(threads),
            kv_blocks: blocks,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn model(&self) -> &AfNext {
        &self.model
    }
    pub fn processor(&self) -> &PromptProcessor {
        &self.proc
    }

    /// Requests that may be in flight at once (running plus waiting).
    pub fn max_in_flight(&self) -> usize {
        self.cfg.scheduler.max_waiting + self.cfg.scheduler.max_running
    }
    pub fn max_new_tokens_limit(&self) -> usize {
        self.cfg
            .max_new_tokens_limit
            .unwrap_or(self.gen.max_new_tokens)
    }
    pub fn max_prompt_tokens(&self) -> usize {
        self.cfg
            .max_prompt_tokens
            .unwrap_or(self.model.cfg.text.max_position_embeddings)
    }
    /// Positions the KV cache holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_blocks * self.cfg.block_size
    }
    pub fn max_audio_seconds(&self) -> f64 {
        f64::from(self.proc.config().frontend.max_audio_len_s)
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight = self.shared.in_flight.load(Ordering::SeqCst);
        s.embeddings = self.shared.cache(|c| c.stats());
        s.windows_encoded = self.shared.windows_encoded.load(Ordering::SeqCst);
        s.block_size = self.cfg.block_size;
        s
    }

    /// Validates and prepares `req` and queues it. Errors here are the client's (bad input, limits) or
    /// capacity; later failures arrive as [`Event::Failed`].
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestHandle> {
        self.submit_traced(req, tracing::Span::none())
    }

    /// [`Engine::submit`] as part of the trace of `span`.
    pub fn submit_traced(
        &self,
        req: GenerateRequest,
        span: tracing::Span,
    ) -> Result<RequestHandle> {
        let t0 = Instant::now();
        let (max_new, in_flight) = self.begin(&req.sampling, req.max_new_tokens)?;
        let overflow = if req.truncate_audio {
            Overflow::Truncate
        } else {
            Overflow::Reject
        };
        let conv = &req.conversation;
        conv.validate()?;
        let mut audios = Vec::new();
        let mut counts = Vec::new();
        let mut audio_keys = Vec::new();
        let mut usage = Usage::default();
        let sr = self.proc.config().frontend.sampling_rate;
        for (i, src) in conv.audios().into_iter().enumerate() {
            let location = afnext_prompt::prepare::describe(i, src);
            // A file is read once: its bytes give the cache key and, on a miss, are what gets decoded.
            let (data, format_hint) = match src {
                AudioSource::Bytes { data, format_hint } => (data.clone(), format_hint.clone()),
                AudioSource::Path(p) => {
                    let data =
                        std::fs::read(p).map_err(|source| afnext_prompt::PromptError::Audio {
                            location: location.clone(),
                            source: afnext_audio::AudioError::Io {
                                path: p.clone(),
                                source,
                            },
                        })?;
                    let ext = p.extension().and_then(|e| e.to_str()).map(str::to_string);
                    (Arc::new(data), ext)
                }
            };
            let key = AudioKey::of(&data, req.truncate_audio);
            audio_keys.push(key);
            if let Some(hit) = self.shared.cache(|c| c.get(&key)) {
                counts.push(hit.tokens);
                usage.audio_seconds += hit.seconds;
                usage.audio_cache_hits += 1;
                audios.push(AudioInput::Cached(hit));
                continue;
            }
            let bytes = AudioSource::Bytes { data, format_hint };
            let prepared =
                afnext_prompt::prepare::prepare_audio(&self.proc, &bytes, overflow, &location)?;
            let features = afnext_prompt::prepare::features(
                &self.frontend,
                &prepared,
                self.cfg.frontend_threads.max(1),
            )?;
            let seconds = prepared.duration_s(sr);
            counts.push(prepared.plan.total_tokens());
            usage.audio_seconds += seconds;
            audios.push(AudioInput::Pending {
                key,
                features,
                seconds,
            });
        }
        let prompt = self.proc.encode(conv, &counts)?;
        let ids = prompt.input_ids;
        self.check_lengths(ids.len(), max_new)?;
        let mut keys: Vec<u64> = ids.iter().map(|&t| u64::from(t)).collect();
        for (span, key) in prompt.audio_spans.iter().zip(&audio_keys) {
            for (row, p) in span.clone().enumerate() {
                keys[p] = key.token_key(row);
            }
        }
        usage.prompt_tokens = ids.len();
        usage.audio_tokens = counts.iter().sum();
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            id,
            prompt_ids: ids,
            keys,
            audios,
            max_new_tokens: max_new,
            sampling: req.sampling,
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            deadline: req.deadline,
            usage,
            submitted: t0,
            prepare_time: t0.elapsed(),
            encode_time: Duration::ZERO,
            tx,
            cancel: cancel.clone(),
            _in_flight: in_flight,
            span,
        };
        self.received_audio(job.usage.audio_seconds);
        let sent = self
            .enc_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| t.send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(EngineError::ShuttingDown);
        }
        Ok(RequestHandle {
            id,
            events: rx,
            cancel,
            loop_tx: self.loop_tx.clone(),
        })
    }

    /// The checks every request passes first: the engine accepts, the sampling parameters and
    /// `max_new_tokens` are valid, and there is room (the returned guard counts the request in flight).
    pub(crate) fn begin(
        &self,
        sampling: &SamplingParams,
        max_new_tokens: Option<usize>,
    ) -> Result<(usize, InFlight)> {
        if let Some(reason) = self.shared.group_lost() {
            return Err(EngineError::GroupLost(reason));
        }
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        sampling.validate().map_err(EngineError::InvalidRequest)?;
        let limit = self.max_new_tokens_limit();
        let max_new = max_new_tokens.unwrap_or(limit);
        if max_new == 0 {
            return Err(EngineError::InvalidRequest(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        if max_new > limit {
            return Err(EngineError::TooLong {
                what: "max_new_tokens",
                got: max_new,
                limit,
            });
        }
        sampling
            .validate_lengths(max_new)
            .map_err(EngineError::InvalidRequest)?;
        // Capacity first: shed load before paying for decoding.
        let cap = self.max_in_flight();
        if self.shared.in_flight.fetch_add(1, Ordering::SeqCst) >= cap {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull { limit: cap });
        }
        Ok((max_new, InFlight(self.shared.clone())))
    }

    /// The prompt fits the prompt limit, and with its completion the KV cache.
    /// Counts an accepted request's audio.
    pub(crate) fn received_audio(&self, seconds: f64) {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .audio_seconds += seconds;
    }

    pub(crate) fn check_lengths(&self, prompt: usize, max_new: usize) -> Result<()> {
        let max_prompt = self.max_prompt_tokens();
        if prompt > max_prompt {
            return Err(EngineError::TooLong {
                what: "the prompt in tokens",
                got: prompt,
                limit: max_prompt,
            });
        }
        if prompt + max_new > self.kv_capacity_tokens() {
            return Err(EngineError::TooLong {
                what: "prompt tokens + max_new_tokens",
                got: prompt + max_new,
                limit: self.kv_capacity_tokens(),
            });
        }
        Ok(())
    }

    /// Stops accepting requests, lets in-flight ones finish for up to `grace`, cancels the rest, and stops the
    /// threads. Returns the number of requests that had to be cancelled.
    pub fn shutdown(&self, grace: Duration) -> usize {
        self.shared.accepting.store(false, Ordering::SeqCst);
        let end = Instant::now() + grace;
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = self.shared.in_flight.load(Ordering::SeqCst);
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.loop_tx.send(Command::CancelAll);
        self.enc_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = self.loop_tx.send(Command::Stop);
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        left
    }

    /// True until [`Engine::shutdown`] starts or the decoder group is lost.
    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::SeqCst)
    }

    /// Why the tensor-parallel decoder group failed (`None` while it works, and always alone): the
    /// process should be restarted.
    pub fn group_lost(&self) -> Option<String> {
        self.shared.group_lost()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}
