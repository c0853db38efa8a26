//! The step loop: one thread that owns the scheduler and the paged KV cache, runs one batched forward per
//! step, samples, and streams events. Commands (new requests, cancellation wake-ups, shutdown) arrive on a
//! channel and are drained between steps, so cancellation frees blocks before the next forward.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afnext_model::paged::{PagedKv, SeqStep};
use afnext_model::tp::{StepPlan, AUDIO_ROW};
use afnext_model::{AfNext, FinishReason, ModelError, Sampler, TextStream};
use afnext_prompt::PromptProcessor;
use candle_core::{DType, Storage, Tensor};

use crate::engine::{Event, Job, Shared, Summary, Timings};
use crate::error::{EngineError, Result};
use crate::group::{Ranks, PING_EVERY};
use crate::remote::{AudioRows, AudioStream};
use crate::scheduler::{AddError, Scheduler, SeqSpec, Step};

/// A request whose audio is encoded, ready for the scheduler.
#[derive(Debug)]
pub(crate) struct Ready {
    pub job: Job,
    pub audio: Option<Tensor>,
    /// Audio rows still to arrive (prepared requests).
    pub stream: Option<AudioStream>,
}

#[derive(Debug)]
pub(crate) enum Command {
    Add(Box<Ready>),
    /// Something changed (a cancellation flag): look again.
    Wake,
    /// Window embeddings of a prepared request ([`crate::Engine::push_window`]).
    Window {
        id: u64,
        audio: usize,
        window: usize,
        rows: Tensor,
    },
    /// Fail everything in flight (end of the shutdown grace period).
    CancelAll,
    Stop,
}

struct Active {
    job: Job,
    audio: AudioRows,
    stream: Option<AudioStream>,
    /// Prompt positions of the `<sound>` tokens, in order.
    sound_pos: Vec<usize>,
    /// `audio_before[p]`: `<sound>` positions in `prompt_ids[..p]` (the audio row of the next one).
    audio_before: Vec<u32>,
    generated: Vec<u32>,
    sampler: Sampler,
    text: TextStream,
    ready_at: Instant,
    admitted_at: Option<Instant>,
    first_token_at: Option<Instant>,
}

pub(crate) struct Worker {
    model: Arc<AfNext>,
    streaming: bool,
    /// The other ranks of a tensor-parallel group (none alone).
    ranks: Option<Ranks>,
    proc: Arc<PromptProcessor>,
    eos: Vec<u32>,
    sched: Scheduler,
    kv: PagedKv,
    shared: Arc<Shared>,
    active: HashMap<u64, Active>,
    /// One row of logits at a time, for the sampler to change (kept across steps).
    scratch: Vec<f32>,
}

impl Worker {
    pub fn new(
        model: Arc<AfNext>,
        proc: Arc<PromptProcessor>,
        eos: Vec<u32>,
        sched: Scheduler,
        kv: PagedKv,
        shared: Arc<Shared>,
    ) -> Self {
        Worker {
            streaming: true,
            ranks: Ranks::of(&model.decoder),
            model,
            proc,
            eos,
            sched,
            kv,
            shared,
            active: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    pub fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        if let Some(r) = &self.ranks {
            if let Err(e) = r.init(&self.kv) {
                self.group_lost(e);
            }
        }
        loop {
            // Block while idle (pinging the group now and then); otherwise only drain what is there.
            let first = if self.active.is_empty() {
                match self.idle_wait(&rx) {
                    Some(c) => Some(c),
                    None => break,
                }
            } else {
                None
            };
            let mut stop = false;
            for cmd in first.into_iter().chain(rx.try_iter()) {
                match cmd {
                    Command::Add(r) => self.add(*r),
                    Command::Window {
                        id,
                        audio,
                        window,
                        rows,
                    } => self.window(id, audio, window, rows),
                    Command::Wake => {}
                    Command::CancelAll => {
                        let ids: Vec<u64> = self.active.keys().copied().collect();
                        for id in ids {
                            self.fail(id, EngineError::ShuttingDown);
                        }
                    }
                    Command::Stop => stop = true,
                }
            }
            if stop {
                break;
            }
            self.reap_cancelled();
            if self.active.is_empty() {
                self.publish(false);
                continue;
            }
            let step = self.sched.schedule(Instant::now());
            for id in &step.expired {
                self.fail(*id, EngineError::DeadlineExceeded);
            }
            if step.items.is_empty() {
                self.publish(false);
                // Nothing runnable (e.g. waiting for blocks held by nobody runnable): avoid spinning.
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            match self.run_step(&step) {
                Ok(()) => {}
                Err(e @ EngineError::GroupLost(_)) => self.group_lost(e),
                Err(e) => {
                    for it in &step.items {
                        self.fail(it.id, EngineError::Internal(format!("step failed: {e}")));
                    }
                }
            }
            self.publish(true);
        }
        if let Some(r) = &self.ranks {
            r.stop();
        }
    }

    /// The next command while idle; `None` when the engine is gone. A group is pinged every
    /// [`PING_EVERY`] meanwhile.
    fn idle_wait(&mut self, rx: &std_mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            if self.ranks.is_none() {
                return rx.recv().ok();
            }
            match rx.recv_timeout(PING_EVERY) {
                Ok(c) => return Some(c),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(Err(e)) = self.ranks.as_ref().map(Ranks::ping) {
                        self.group_lost(e);
                    }
                }
            }
        }
    }

    /// A rank is gone: fail everything, accept nothing more, and stop talking to the group.
    fn group_lost(&mut self, e: EngineError) {
        let reason = match e {
            EngineError::GroupLost(r) => r,
            other => other.to_string(),
        };
        self.ranks = None;
        self.shared.lose_group(&reason);
        let ids: Vec<u64> = self.active.keys().copied().collect();
        for id in ids {
            self.fail(id, EngineError::GroupLost(reason.clone()));
        }
    }

    /// Prefill audio rows as they arrive (see [`crate::EngineConfig::streaming_prefill`]).
    pub fn streaming_prefill(mut self, on: bool) -> Self {
        self.streaming = on;
        self
    }

    fn add(&mut self, r: Ready) {
        let job = r.job;
        if job.cancelled() {
            let _ = job.tx.send(Event::Failed(EngineError::Cancelled));
            return;
        }
        let spec = SeqSpec {
            id: job.id,
            keys: job.keys.clone(),
            max_new_tokens: job.max_new_tokens,
            arrival: job.submitted,
            deadline: job.deadline,
        };
        if let Err(e) = self.sched.add(spec) {
            let err = match e {
                AddError::QueueFull { limit } => EngineError::QueueFull { limit },
                AddError::TooLarge { needed, capacity } => EngineError::TooLong {
                    what: "prompt tokens + max_new_tokens",
                    got: needed,
                    limit: capacity,
                },
                AddError::Duplicate(id) => EngineError::Internal(format!("duplicate request {id}")),
            };
            let _ = job.tx.send(Event::Failed(err));
            return;
        }
        let mut audio_before = Vec::with_capacity(job.prompt_ids.len() + 1);
        let mut sound_pos = Vec::new();
        audio_before.push(0);
        for (p, &t) in job.prompt_ids.iter().enumerate() {
            if t == self.model.cfg.audio_token_id {
                sound_pos.push(p);
            }
            audio_before.push(sound_pos.len() as u32);
        }
        let vocab = self.model.cfg.text.vocab_size;
        let audio = match AudioRows::whole(r.audio) {
            Ok(a) => a,
            Err(e) => {
                self.sched.remove(job.id);
                let _ = job.tx.send(Event::Failed(e));
                return;
            }
        };
        let id = job.id;
        let active = Active {
            sampler: Sampler::new(job.sampling, vocab, &job.prompt_ids, &self.eos),
            text: TextStream::new(&job.stop),
            audio,
            stream: r.stream,
            sound_pos,
            audio_before,
            generated: Vec::new(),
            ready_at: Instant::now(),
            admitted_at: None,
            first_token_at: None,
            job,
        };
        self.active.insert(id, active);
        self.audio_arrived(id);
    }

    /// Window rows of a prepared request: taken in order, and prefill may go as far as they reach.
    fn window(&mut self, id: u64, audio: usize, window: usize, rows: Tensor) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        let Some(stream) = a.stream.as_mut() else {
            return;
        };
        match stream.accept(audio, window, rows) {
            Ok(true) => {
                self.shared
                    .windows_encoded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = a.job.tx.send(Event::EncodeProgress {
                    windows_done: stream.windows_done,
                    windows_total: stream.windows_total,
                });
                if stream.windows_done == stream.windows_total {
                    a.job.encode_time = a.job.submitted.elapsed();
                }
                self.audio_arrived(id);
            }
            Ok(false) => {}
            Err(e) => self.fail(id, e),
        }
    }

    /// Moves arrived audio rows into place and tells the scheduler how far the prompt can be computed.
    fn audio_arrived(&mut self, id: u64) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        let Some(stream) = a.stream.as_mut() else {
            return;
        };
        if let Err(e) = stream.drain_into(&mut a.audio, &self.shared) {
            self.fail(id, e);
            return;
        }
        let have = a.audio.len();
        let ready = match a.sound_pos.get(have) {
            None => a.job.prompt_ids.len(),
            Some(&p) if self.streaming => p,
            // Encode everything first: nothing of the prompt runs before the last window.
            Some(_) => 0,
        };
        self.sched.set_ready(id, ready);
    }

    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| a.job.cancelled() || a.job.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.fail(id, EngineError::Cancelled);
        }
    }

    /// Ends a request with an error and frees its blocks.
    fn fail(&mut self, id: u64, e: EngineError) {
        self.sched.remove(id);
        if let Some(a) = self.active.remove(&id) {
            let _ = a.job.tx.send(Event::Failed(e));
        }
    }

    fn run_step(&mut self, step: &Step) -> Result<()> {
        let now = Instant::now();
        for (id, cached) in &step.admitted {
            if let Some(a) = self.active.get_mut(id) {
                a.admitted_at = Some(now);
                a.job.usage.cached_tokens = *cached;
                let _ = a.job.tx.send(Event::Started {
                    prompt_tokens: a.job.usage.prompt_tokens,
                    audio_tokens: a.job.usage.audio_tokens,
                    cached_tokens: *cached,
                });
            }
        }
        if self.shared.group_lost().is_some() {
            return Err(EngineError::GroupLost("an earlier step failed".into()));
        }
        let audio_id = self.model.cfg.audio_token_id;
        let mut plan = StepPlan {
            seqs: Vec::with_capacity(step.items.len()),
            ids: Vec::new(),
            sample_rows: Vec::new(),
            copies: step.copies.clone(),
        };
        let mut audio = Vec::new();
        for it in &step.items {
            let a = self
                .active
                .get(&it.id)
                .ok_or_else(|| EngineError::Internal(format!("unknown sequence {}", it.id)))?;
            // Prompt rows (`<sound>` rows from the audio embeddings), then generated ids.
            let pl = a.job.prompt_ids.len();
            let (from, to) = (it.start, it.start + it.len);
            if from < pl {
                let ids = &a.job.prompt_ids[from..to.min(pl)];
                let n = ids.iter().filter(|&&t| t == audio_id).count();
                if n > 0 {
                    let first = a.audio_before[from] as usize;
                    audio.push(a.audio.rows(first, n)?);
                }
                plan.ids.extend(
                    ids.iter()
                        .map(|&t| if t == audio_id { AUDIO_ROW } else { t }),
                );
            }
            if to > pl {
                plan.ids
                    .extend_from_slice(&a.generated[from.max(pl) - pl..to - pl]);
            }
            if it.sample {
                plan.sample_rows.push(plan.ids.len() as u32 - 1);
            }
            plan.seqs.push(SeqStep {
                start: it.start,
                len: it.len,
                block_table: it.block_table.clone(),
            });
        }
        let audio = match audio.len() {
            0 => None,
            1 => audio.pop(),
            _ => Some(Tensor::cat(&audio, 0).map_err(model_err)?),
        };
        // One span per step: a child of its first request's span, linked to the others'.
        let first = step.items.first().and_then(|it| self.active.get(&it.id));
        let span = match first {
            Some(a) => tracing::info_span!(
                parent: &a.job.span,
                "step",
                otel.name = "decoder.step",
                sequences = step.items.len(),
                rows = plan.ids.len()
            ),
            None => tracing::Span::none(),
        };
        for it in step.items.iter().skip(1) {
            if let Some(a) = self.active.get(&it.id) {
                afnext_telemetry::link(&span, &a.job.span);
            }
        }
        let _entered = span.enter();
        if let Some(r) = &self.ranks {
            r.step(&plan, audio.as_ref(), afnext_telemetry::traceparent(&span))?;
        }
        let logits = self
            .model
            .decoder
            .run_step(&plan, audio.as_ref(), &self.kv)
            .map_err(|e| match e {
                ModelError::Collective(c) => EngineError::GroupLost(c.to_string()),
                e => EngineError::Model(e),
            })?;
        self.sched.complete(&step.items);
        let Some(logits) = logits else {
            return Ok(());
        };
        // Each row is copied into the scratch row, in place from a CPU tensor: `to_vec2` put a 16-row step's
        // logits (9.7 MB at a 151 672-id vocabulary) into 16 new vectors on this thread, a few ms a step.
        let logits = logits.to_dtype(DType::F32).map_err(model_err)?;
        let (_, vocab) = logits.dims2().map_err(model_err)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        let sampled = step.items.iter().filter(|i| i.sample);
        let (storage, layout) = logits.storage_and_layout();
        let res = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(cpu), Some((from, to))) => {
                let data = &cpu.as_slice::<f32>().map_err(model_err)?[from..to];
                self.sample_rows(sampled, data.chunks_exact(vocab), &mut scratch)
            }
            _ => {
                let data: Vec<f32> = logits
                    .flatten_all()
                    .and_then(|l| l.to_vec1())
                    .map_err(model_err)?;
                self.sample_rows(sampled, data.chunks_exact(vocab), &mut scratch)
            }
        };
        self.scratch = scratch;
        res
    }

    /// [`Self::on_logits`] for each sampled item and its row of logits, in order.
    fn sample_rows<'a>(
        &mut self,
        items: impl Iterator<Item = &'a crate::scheduler::StepItem>,
        rows: impl Iterator<Item = &'a [f32]>,
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        for (it, row) in items.zip(rows) {
            scratch.clear();
            scratch.extend_from_slice(row);
            self.on_logits(it.id, scratch)?;
        }
        Ok(())
    }

    fn on_logits(&mut self, id: u64, logits: &mut [f32]) -> Result<()> {
        let tok = self.proc.tokenizer();
        let Some(a) = self.active.get_mut(&id) else {
            return Ok(());
        };
        let now = Instant::now();
        if a.first_token_at.is_none() {
            a.first_token_at = Some(now);
        }
        let t = a.sampler.sample(logits);
        // Counted before any event goes out: a client that reads the metrics after its stream ends must see
        // its last token (it was counted after the Finished event, and a scrape could miss it).
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tokens_generated += 1;
        let mut finish = None;
        if !a.job.ignore_eos && self.eos.contains(&t) {
            finish = Some(FinishReason::Eos);
        } else {
            a.generated.push(t);
            a.sampler.observe(t);
            let (mut text, hit) = a.text.push(tok, t)?;
            if hit {
                finish = Some(FinishReason::StopString);
            }
            if finish.is_none() && a.generated.len() >= a.job.max_new_tokens {
                finish = Some(FinishReason::Length);
            }
            if finish.is_some() && finish != Some(FinishReason::StopString) {
                // Flush what the detokenizer and the stop matcher still hold.
                let (out, hit) = a.text.finish(tok)?;
                text.push_str(&out);
                if hit {
                    finish = Some(FinishReason::StopString);
                }
            }
            let _ = a.job.tx.send(Event::Delta {
                text,
                token_ids: vec![t],
            });
        }
        match finish {
            None => self.sched.append(id, t),
            Some(reason) => {
                if reason == FinishReason::Eos {
                    // Anything still held back is released at the end of the text.
                    let (rest, _) = a.text.finish(tok)?;
                    if !rest.is_empty() {
                        let _ = a.job.tx.send(Event::Delta {
                            text: rest,
                            token_ids: Vec::new(),
                        });
                    }
                }
                let preemptions = self.sched.preemptions_of(id);
                self.sched.remove(id);
                let a = self.active.remove(&id).expect("present above");
                let mut usage = a.job.usage;
                usage.completion_tokens = a.generated.len();
                let first = a.first_token_at.unwrap_or(now);
                let admitted = a.admitted_at.unwrap_or(a.ready_at);
                let timings = Timings {
                    prepare: a.job.prepare_time,
                    encode: a.job.encode_time,
                    queue: admitted.saturating_duration_since(a.ready_at),
                    prefill: first.saturating_duration_since(admitted),
                    time_to_first_token: first.saturating_duration_since(a.job.submitted),
                    total: now.saturating_duration_since(a.job.submitted),
                };
                // Counted before the client hears of it (as the token above).
                self.shared
                    .stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .requests_finished += 1;
                let _ = a.job.tx.send(Event::Finished(Summary {
                    finish_reason: reason,
                    usage,
                    timings,
                    preemptions,
                }));
            }
        }
        Ok(())
    }

    fn publish(&self, stepped: bool) {
        let st = self.sched.stats();
        let mut s = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.running = st.running;
        s.waiting = st.waiting;
        s.kv = st.blocks;
        s.preemptions = st.preemptions;
        if stepped {
            s.steps += 1;
        }
    }
}

fn model_err(e: candle_core::Error) -> EngineError {
    EngineError::Model(e.into())
}
