//! Requests prepared elsewhere: in the cluster the router decodes audio, renders and tokenizes the prompt,
//! and the encoder workers send each window's embeddings straight here as they finish. The step loop
//! prefills the text before the audio at once and each window's rows as they arrive, in order (streaming
//! prefill: encoding and prefill overlap).
//!
//! Audio the embedding cache holds (a follow-up turn) is attached at submission and reported as not
//! needed, so the router does not encode it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use afnext_model::SamplingParams;
use candle_core::Tensor;
use tokio::sync::mpsc;

use crate::cache::{AudioEmbeds, AudioKey};
use crate::engine::{Engine, Job, RequestHandle, Shared, Usage};
use crate::error::{EngineError, Result};
use crate::worker::{Command, Ready};

/// One audio of a prepared request.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteAudio {
    /// The audio's identity (the same key `Engine::submit` computes from its bytes).
    pub key: AudioKey,
    /// Audio tokens of each window, in order (a last window may yield 0 and is never sent).
    pub window_tokens: Vec<usize>,
    pub seconds: f64,
}

/// A request whose prompt is already tokenized (the `<sound>` runs included) and whose audio embeddings
/// arrive through [`Engine::push_window`].
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub prompt_ids: Vec<u32>,
    /// In prompt order: audio `i` fills the `i`-th run of `<sound>` positions.
    pub audios: Vec<RemoteAudio>,
    pub max_new_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub deadline: Option<Instant>,
    /// Time the caller spent preparing (reported in the timings).
    pub prepare_time: Duration,
    /// The request's trace span.
    pub span: tracing::Span,
}

/// A prepared request the engine took.
#[derive(Debug)]
pub struct Accepted {
    pub handle: RequestHandle,
    /// Per audio: true when its window embeddings must be pushed (false: served from the cache).
    pub needed: Vec<bool>,
}

impl Engine {
    /// Queues a prepared request. Its audio rows are then pushed window by window.
    pub fn submit_prepared(&self, req: PreparedRequest) -> Result<Accepted> {
        let t0 = Instant::now();
        let (max_new, in_flight) = self.begin(&req.sampling, req.max_new_tokens)?;
        let ids = req.prompt_ids;
        let vocab = self.model.cfg.text.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        self.check_lengths(ids.len(), max_new)?;
        let audio_id = self.model.cfg.audio_token_id;
        let sound: Vec<usize> = (0..ids.len()).filter(|&p| ids[p] == audio_id).collect();
        let want: usize = req
            .audios
            .iter()
            .map(|a| a.window_tokens.iter().sum::<usize>())
            .sum();
        if want != sound.len() {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} audio positions but its audios have {want} tokens",
                sound.len()
            )));
        }
        let mut keys: Vec<u64> = ids.iter().map(|&t| u64::from(t)).collect();
        let mut usage = Usage {
            prompt_tokens: ids.len(),
            audio_tokens: want,
            ..Usage::default()
        };
        let mut slots = Vec::new();
        let mut needed = Vec::with_capacity(req.audios.len());
        let mut at = 0;
        for (i, a) in req.audios.iter().enumerate() {
            let n: usize = a.window_tokens.iter().sum();
            for row in 0..n {
                keys[sound[at + row]] = a.key.token_key(row);
            }
            at += n;
            usage.audio_seconds += a.seconds;
            match self
                .shared
                .cache(|c| c.get(&a.key))
                .filter(|e| e.tokens == n)
            {
                Some(hit) => {
                    usage.audio_cache_hits += 1;
                    needed.push(false);
                    slots.push(Slot::Cached(hit.rows.clone()));
                }
                None => {
                    needed.push(n > 0);
                    slots.extend(
                        a.window_tokens
                            .iter()
                            .enumerate()
                            .filter(|(_, &t)| t > 0)
                            .map(|(w, &tokens)| Slot::Window {
                                audio: i,
                                window: w,
                                tokens,
                            }),
                    );
                }
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stream = AudioStream::new(slots, &req.audios);
        let job = Job {
            id,
            prompt_ids: ids,
            keys,
            audios: Vec::new(),
            max_new_tokens: max_new,
            sampling: req.sampling,
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            deadline: req.deadline,
            usage,
            submitted: t0,
            prepare_time: req.prepare_time + t0.elapsed(),
            encode_time: Duration::ZERO,
            tx,
            cancel: cancel.clone(),
            _in_flight: in_flight,
            span: req.span,
        };
        let ready = Ready {
            job,
            audio: None,
            stream: Some(stream),
        };
        let seconds = ready.job.usage.audio_seconds;
        if self.loop_tx.send(Command::Add(Box::new(ready))).is_err() {
            return Err(EngineError::ShuttingDown);
        }
        self.received_audio(seconds);
        Ok(Accepted {
            handle: RequestHandle {
                id,
                events: rx,
                cancel,
                loop_tx: self.loop_tx.clone(),
            },
            needed,
        })
    }

    /// Delivers the embeddings `[tokens, hidden]` of window `window` of audio `audio` of request `id`.
    /// Windows may come in any order and more than once (a retried window is ignored); rows of the wrong
    /// shape fail the request. Windows of requests that are gone are dropped.
    pub fn push_window(&self, id: u64, audio: usize, window: usize, rows: Tensor) -> Result<()> {
        let hidden = self.model.cfg.text.hidden_size;
        match rows.dims() {
            [_, h] if *h == hidden => {}
            d => {
                return Err(EngineError::InvalidRequest(format!(
                    "window embeddings must be [tokens, {hidden}], got {d:?}"
                )))
            }
        }
        let rows = rows
            .to_dtype(self.model.dtype())
            .and_then(|r| r.to_device(self.model.device()))
            .map_err(|e| EngineError::Model(e.into()))?;
        self.loop_tx
            .send(Command::Window {
                id,
                audio,
                window,
                rows,
            })
            .map_err(|_| EngineError::ShuttingDown)
    }
}

#[derive(Debug)]
enum Slot {
    /// A whole audio from the embedding cache.
    Cached(Tensor),
    Window {
        audio: usize,
        window: usize,
        tokens: usize,
    },
}

/// The audio rows of a request in prompt order, possibly in many parts.
#[derive(Debug, Default)]
pub(crate) struct AudioRows {
    parts: Vec<Tensor>,
    /// End row of each part.
    ends: Vec<usize>,
}

impl AudioRows {
    pub fn whole(t: Option<Tensor>) -> Result<Self> {
        let mut r = AudioRows::default();
        if let Some(t) = t {
            r.push(t)?;
        }
        Ok(r)
    }

    pub fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn push(&mut self, t: Tensor) -> Result<()> {
        let n = t.dim(0).map_err(|e| EngineError::Model(e.into()))?;
        self.ends.push(self.len() + n);
        self.parts.push(t);
        Ok(())
    }

    /// Rows `first..first + n`.
    pub fn rows(&self, first: usize, n: usize) -> Result<Tensor> {
        if first + n > self.len() {
            return Err(EngineError::Internal(format!(
                "audio rows {first}..{} requested, {} arrived",
                first + n,
                self.len()
            )));
        }
        let mut out = Vec::new();
        let mut begin = 0;
        for (p, &end) in self.parts.iter().zip(&self.ends) {
            let (lo, hi) = (first.max(begin), (first + n).min(end));
            if lo < hi {
                out.push(
                    p.narrow(0, lo - begin, hi - lo)
                        .map_err(|e| EngineError::Model(e.into()))?,
                );
            }
            begin = end;
        }
        if out.len() == 1 {
            return Ok(out.pop().expect("one part"));
        }
        Tensor::cat(&out, 0).map_err(|e| EngineError::Model(e.into()))
    }
}

/// Windows of a prepared request still to arrive, and what to do when they do.
#[derive(Debug)]
pub(crate) struct AudioStream {
    slots: Vec<Slot>,
    next: usize,
    early: HashMap<usize, Tensor>,
    /// Per audio: its key, seconds, window count, and the rows received so far (for the embedding cache).
    audios: Vec<(AudioKey, f64, usize, Vec<Tensor>)>,
    pub windows_total: usize,
    pub windows_done: usize,
}

impl AudioStream {
    fn new(slots: Vec<Slot>, audios: &[RemoteAudio]) -> Self {
        let windows_total = slots
            .iter()
            .filter(|s| matches!(s, Slot::Window { .. }))
            .count();
        AudioStream {
            slots,
            next: 0,
            early: HashMap::new(),
            audios: audios
                .iter()
                .map(|a| (a.key, a.seconds, a.window_tokens.len(), Vec::new()))
                .collect(),
            windows_total,
            windows_done: 0,
        }
    }

    /// Moves every part that is next in order into `rows`; audios completed by this are put into the
    /// embedding cache.
    pub fn drain_into(&mut self, rows: &mut AudioRows, shared: &Shared) -> Result<()> {
        while let Some(slot) = self.slots.get(self.next) {
            let part = match slot {
                Slot::Cached(t) => t.clone(),
                Slot::Window { audio, .. } => {
                    let Some(t) = self.early.remove(&self.next) else {
                        break;
                    };
                    let a = &mut self.audios[*audio];
                    a.3.push(t.clone());
                    let last = !matches!(
                        self.slots.get(self.next + 1),
                        Some(Slot::Window { audio: b, .. }) if b == audio
                    );
                    if last {
                        let all = Tensor::cat(&a.3, 0).map_err(|e| EngineError::Model(e.into()))?;
                        a.3.clear();
                        let tokens = all.dim(0).map_err(|e| EngineError::Model(e.into()))?;
                        let e = Arc::new(AudioEmbeds {
                            rows: all,
                            tokens,
                            windows: a.2,
                            seconds: a.1,
                        });
                        let key = a.0;
                        shared.cache(|c| c.insert(key, e));
                    }
                    t
                }
            };
            rows.push(part)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Takes window `window` of audio `audio`. `Ok(false)`: a duplicate or a window this request does not
    /// wait for (ignored).
    pub fn accept(&mut self, audio: usize, window: usize, rows: Tensor) -> Result<bool> {
        let Some(i) = self.slots.iter().position(|s| {
            matches!(s, Slot::Window { audio: a, window: w, .. } if *a == audio && *w == window)
        }) else {
            return Ok(false);
        };
        if i < self.next || self.early.contains_key(&i) {
            return Ok(false);
        }
        let Slot::Window { tokens, .. } = self.slots[i] else {
            unreachable!("matched a window above")
        };
        let n = rows.dim(0).map_err(|e| EngineError::Model(e.into()))?;
        if n != tokens {
            return Err(EngineError::Internal(format!(
                "window {window} of audio {audio} came with {n} rows, {tokens} expected"
            )));
        }
        self.early.insert(i, rows);
        self.windows_done += 1;
        Ok(true)
    }
}
