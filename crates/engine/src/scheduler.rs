//! Continuous batching: which sequences run in the next forward step, and how many positions each.
//!
//! Pure logic, no I/O, no tensors; the clock is an argument. One call to [`Scheduler::schedule`] plans one step
//! under a token budget (`max_batch_tokens` rows in the forward):
//!
//! 1. Requests past their deadline leave (their blocks are freed) and are reported.
//! 2. Every running sequence that is decoding gets its one position, oldest first.
//! 3. Running sequences still prefilling get chunks of at most `prefill_chunk` positions from what is left of
//!    the budget, oldest first. A 45 000-token prompt therefore advances chunk by chunk between the decode
//!    steps of everyone else and never stalls them.
//! 4. Waiting requests are admitted in arrival order (a request that does not fit blocks the ones behind it, so
//!    a big request is not starved by a stream of small ones). Admission first takes every full block of the
//!    prompt that the prefix cache holds; then, if a cached block after those shares the prompt's next
//!    positions but not all of them, a new block of the sequence's own receives a copy of those positions'
//!    rows before the step runs ([`Step::copies`]), and the prefill starts after them.
//!
//! When a running sequence needs a block and none is free, the newest running sequence is preempted by
//! *recompute*: its blocks are released (full ones stay in the prefix cache, and the written positions of its
//! last partial block are filed for a copy, so resuming usually finds them again) and it goes back to the
//! waiting queue in arrival order with everything it generated so far; its sampler state is kept by the
//! engine, so the resumed sequence continues exactly where it stopped.
//! Recompute was chosen over swapping because there is no second memory tier on a CPU host and the prefix
//! cache makes most of the recomputation free.

use std::collections::HashMap;
use std::time::Instant;

pub use afnext_model::paged::BlockCopy;

use crate::block::{BlockId, BlockKey, BlockManager, BlockStats};

pub type SeqId = u64;

/// Limits of one step and of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Positions computed per forward step, over all sequences.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests waiting beyond `max_running`; more are refused (the queue holds at most
    /// `max_running + max_waiting` requests in all).
    pub max_waiting: usize,
    /// Largest prefill chunk of one sequence in one step.
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 512,
            max_running: 32,
            max_waiting: 256,
            prefill_chunk: 512,
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_running == 0 || self.prefill_chunk == 0 {
            return Err("max_running and prefill_chunk must be at least 1".into());
        }
        if self.max_batch_tokens <= self.max_running {
            return Err(format!(
                "max_batch_tokens ({}) must exceed max_running ({}) so that prefills always progress",
                self.max_batch_tokens, self.max_running
            ));
        }
        Ok(())
    }
}

/// A request as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct SeqSpec {
    pub id: SeqId,
    /// Content identity of every prompt position ([`crate::TokenKey`]).
    pub keys: Vec<u64>,
    pub max_new_tokens: usize,
    pub arrival: Instant,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the queue is full ({limit} requests waiting)")]
    QueueFull { limit: usize },
    #[error(
        "the request needs up to {needed} positions of KV cache but the cache holds {capacity}"
    )]
    TooLarge { needed: usize, capacity: usize },
    #[error("sequence {0} is already scheduled")]
    Duplicate(SeqId),
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepItem {
    pub id: SeqId,
    /// First position computed.
    pub start: usize,
    /// Positions computed.
    pub len: usize,
    pub block_table: Vec<BlockId>,
    /// The step reaches the last known token: its logits give the next token.
    pub sample: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub items: Vec<StepItem>,
    /// Sent back to the queue this step (recompute preemption).
    pub preempted: Vec<SeqId>,
    /// Removed: deadline passed.
    pub expired: Vec<SeqId>,
    /// Admitted for the first time this step, with the prompt positions found in the prefix cache.
    pub admitted: Vec<(SeqId, usize)>,
    /// Rows to copy between blocks before the step's forward: a cached block's first positions into a block
    /// of a sequence admitted with them (see [`BlockManager::partial`]).
    pub copies: Vec<BlockCopy>,
}

impl Step {
    pub fn tokens(&self) -> usize {
        self.items.iter().map(|i| i.len).sum()
    }
}

#[derive(Debug)]
struct Seq {
    keys: Vec<u64>,
    prompt_len: usize,
    computed: usize,
    table: Vec<BlockId>,
    /// Keys of the first `block_keys.len()` blocks of `table` (registered in the prefix cache or taken from it).
    block_keys: Vec<BlockKey>,
    /// Positions whose keys and values are known to be in the blocks: found whole in the prefix cache, or
    /// computed by a step that completed (not yet the rows a pending copy brings, nor a failed step's).
    written: usize,
    arrival: Instant,
    deadline: Option<Instant>,
    admitted_once: bool,
    preemptions: u32,
    /// Prompt positions whose inputs exist (audio embeddings still arriving stop prefill there).
    ready: usize,
}

impl Seq {
    /// Positions that can be computed now.
    fn available(&self) -> usize {
        if self.ready >= self.prompt_len {
            self.keys.len()
        } else {
            self.ready
        }
    }
    /// Positions that can be computed now and are not yet.
    fn remaining(&self) -> usize {
        self.available().saturating_sub(self.computed)
    }
    /// The prompt is done and one sampled token waits to be computed.
    fn decoding(&self) -> bool {
        self.computed + 1 == self.keys.len() && self.computed >= self.prompt_len
    }
}

/// Queue and running set over a [`BlockManager`].
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Seq>,
    /// Both ordered by (arrival, id).
    waiting: Vec<SeqId>,
    running: Vec<SeqId>,
    preemptions: u64,
    /// Sources of the last step's copies: held until the step has run (released by the next
    /// [`Scheduler::complete`] or [`Scheduler::schedule`], whichever comes first).
    copy_sources: Vec<BlockId>,
}

/// Counters for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    pub blocks: BlockStats,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            cfg,
            blocks,
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            preemptions: 0,
            copy_sources: Vec::new(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            preemptions: self.preemptions,
            blocks: self.blocks.stats(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Positions the KV cache can hold.
    pub fn capacity(&self) -> usize {
        self.blocks.num_blocks() * self.blocks.block_size()
    }

    /// Queues a request.
    pub fn add(&mut self, spec: SeqSpec) -> Result<(), AddError> {
        if self.seqs.contains_key(&spec.id) {
            return Err(AddError::Duplicate(spec.id));
        }
        let limit = self.cfg.max_waiting + self.cfg.max_running;
        if self.seqs.len() >= limit {
            return Err(AddError::QueueFull { limit });
        }
        let needed = spec.keys.len() + spec.max_new_tokens;
        if needed > self.capacity() {
            return Err(AddError::TooLarge {
                needed,
                capacity: self.capacity(),
            });
        }
        let id = spec.id;
        self.seqs.insert(
            id,
            Seq {
                prompt_len: spec.keys.len(),
                keys: spec.keys,
                computed: 0,
                table: Vec::new(),
                block_keys: Vec::new(),
                written: 0,
                arrival: spec.arrival,
                deadline: spec.deadline,
                admitted_once: false,
                preemptions: 0,
                ready: usize::MAX,
            },
        );
        self.insert_ordered(false, id);
        Ok(())
    }

    /// Removes a sequence (cancelled, failed or finished) and frees its blocks now. False if unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let Some(mut s) = self.seqs.remove(&id) else {
            return false;
        };
        leave(&mut self.blocks, &mut s);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        true
    }

    /// Appends the token sampled for `id` (its key is the token id); the next step computes it.
    pub fn append(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.keys.push(u64::from(token));
        }
    }

    /// Declares the first `positions` prompt positions computable (their audio rows have arrived); prefill
    /// stops there until more are. Every position is computable unless this is called.
    pub fn set_ready(&mut self, id: SeqId, positions: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.ready = positions;
        }
    }

    /// Generated tokens so far.
    pub fn generated(&self, id: SeqId) -> usize {
        self.seqs
            .get(&id)
            .map_or(0, |s| s.keys.len() - s.prompt_len)
    }

    pub fn preemptions_of(&self, id: SeqId) -> u32 {
        self.seqs.get(&id).map_or(0, |s| s.preemptions)
    }

    /// Records that the step's items were computed: advances them and enters their newly full blocks in the
    /// prefix cache.
    pub fn complete(&mut self, items: &[StepItem]) {
        self.release_copy_sources();
        let bs = self.blocks.block_size();
        for it in items {
            let Some(s) = self.seqs.get_mut(&it.id) else {
                continue;
            };
            s.computed = it.start + it.len;
            s.written = s.computed;
            while (s.block_keys.len() + 1) * bs <= s.computed {
                let j = s.block_keys.len();
                let tokens = &s.keys[j * bs..(j + 1) * bs];
                let key = BlockKey::new(s.block_keys.last(), tokens);
                self.blocks
                    .register(s.table[j], key, s.block_keys.last(), tokens);
                s.block_keys.push(key);
            }
        }
    }

    /// Plans the next step at time `now`.
    pub fn schedule(&mut self, now: Instant) -> Step {
        // The previous step has run (or failed) by now: its copies are done.
        self.release_copy_sources();
        let mut step = Step::default();
        let expired: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.remove(id);
            step.expired.push(id);
        }
        let mut budget = self.cfg.max_batch_tokens;
        // Decodes, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            if !self.seqs[&id].decoding() {
                i += 1;
                continue;
            }
            if self.grow(id, 1, &mut step) {
                step.items.push(self.item(id, 1));
                budget -= 1;
                i += 1;
            } else if !self.running.contains(&id) {
                // `id` itself was the newest and got preempted; `running[i]` is now the next one.
            } else {
                i += 1;
            }
        }
        // Prefill chunks of running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let rem = self.seqs[&id].remaining();
            if rem == 0 || self.seqs[&id].decoding() {
                i += 1;
                continue;
            }
            let want = rem.min(budget).min(self.cfg.prefill_chunk);
            let len = self.grow_up_to(id, want);
            if len > 0 {
                step.items.push(self.item(id, len));
                budget -= len;
            } else if let Some(&victim) = self.running.last().filter(|&&v| v != id) {
                // Out of blocks: a newer sequence yields so that the older one can progress (otherwise
                // prefills holding partial prompts could wait on each other forever).
                self.preempt(victim);
                step.preempted.push(victim);
                continue;
            }
            i += 1;
        }
        // Admissions in arrival order. A sequence with nothing computable yet (its audio has not arrived)
        // stays waiting without holding up the ones behind it.
        let mut j = 0;
        while budget > 0 && self.running.len() < self.cfg.max_running && j < self.waiting.len() {
            let id = self.waiting[j];
            let (cached, copy) = self.match_prefix(id);
            let rem = self.seqs[&id].remaining();
            let want = rem.min(budget).min(self.cfg.prefill_chunk);
            let s = &self.seqs[&id];
            let need = (s.computed + want).div_ceil(self.blocks.block_size()) - s.table.len();
            if want == 0 || need > self.blocks.available() {
                // Not admitted: give back what the lookup took (nothing was written for it, so nothing is
                // filed).
                leave(
                    &mut self.blocks,
                    self.seqs.get_mut(&id).expect("waiting id is known"),
                );
                if let Some(c) = copy {
                    self.blocks.release(c.src);
                }
                if want == 0 {
                    j += 1;
                    continue;
                }
                break;
            }
            if let Some(c) = copy {
                self.copy_sources.push(c.src);
                step.copies.push(c);
            }
            self.waiting.remove(j);
            self.insert_ordered(true, id);
            let got = self.grow_up_to(id, want);
            debug_assert_eq!(got, want);
            let s = self.seqs.get_mut(&id).expect("admitted id is known");
            if !s.admitted_once {
                s.admitted_once = true;
                step.admitted.push((id, cached));
            }
            step.items.push(self.item(id, want));
            budget -= want;
        }
        // A sequence preempted after it was given an item this step must not run.
        step.items.retain(|it| !step.preempted.contains(&it.id));
        step
    }

    fn item(&self, id: SeqId, len: usize) -> StepItem {
        let s = &self.seqs[&id];
        StepItem {
            id,
            start: s.computed,
            len,
            block_table: s.table.clone(),
            sample: s.computed + len == s.keys.len(),
        }
    }

    /// Takes every full prompt block the prefix cache holds, then the first positions of a cached block that
    /// shares some of the next ones (copied into a new block of the sequence's own, which the returned copy
    /// fills; its source is referenced until the copy is done), always leaving one position to compute, whose
    /// logits start generation. Returns the prompt positions found, and the copy.
    fn match_prefix(&mut self, id: SeqId) -> (usize, Option<BlockCopy>) {
        let bs = self.blocks.block_size();
        let s = self.seqs.get_mut(&id).expect("known id");
        debug_assert!(s.table.is_empty() && s.computed == 0);
        let max_blocks = (s.keys.len() - 1) / bs;
        for j in 0..max_blocks {
            let key = BlockKey::new(s.block_keys.last(), &s.keys[j * bs..(j + 1) * bs]);
            match self.blocks.lookup(&key) {
                Some(b) => {
                    s.table.push(b);
                    s.block_keys.push(key);
                }
                None => break,
            }
        }
        s.computed = s.table.len() * bs;
        s.written = s.computed;
        let mut copy = None;
        let next = &s.keys[s.computed..(s.computed + bs).min(s.keys.len() - 1)];
        if !next.is_empty() {
            if let Some((src, rows)) = self.blocks.partial(s.block_keys.last(), next) {
                match self.blocks.allocate() {
                    Some(dst) => {
                        s.table.push(dst);
                        s.computed += rows;
                        copy = Some(BlockCopy { src, dst, rows });
                    }
                    None => self.blocks.release(src),
                }
            }
        }
        (s.computed.min(s.prompt_len), copy)
    }

    fn release_copy_sources(&mut self) {
        for b in std::mem::take(&mut self.copy_sources) {
            self.blocks.release(b);
        }
    }

    /// Makes room for `n` more positions of `id`, preempting newer running sequences if needed. False if `id`
    /// could not grow (it may itself have been preempted).
    fn grow(&mut self, id: SeqId, n: usize, step: &mut Step) -> bool {
        loop {
            let s = &self.seqs[&id];
            let need = (s.computed + n).div_ceil(self.blocks.block_size());
            if need <= s.table.len() {
                return true;
            }
            if let Some(b) = self.blocks.allocate() {
                self.seqs.get_mut(&id).expect("known id").table.push(b);
                continue;
            }
            let Some(&victim) = self.running.last() else {
                return false;
            };
            self.preempt(victim);
            step.preempted.push(victim);
            if victim == id {
                return false;
            }
        }
    }

    /// Grows `id` by up to `want` positions without preempting anyone; returns how many fit.
    fn grow_up_to(&mut self, id: SeqId, want: usize) -> usize {
        let bs = self.blocks.block_size();
        let s = self.seqs.get_mut(&id).expect("known id");
        while (s.computed + want).div_ceil(bs) > s.table.len() {
            match self.blocks.allocate() {
                Some(b) => s.table.push(b),
                None => break,
            }
        }
        (s.table.len() * bs - s.computed).min(want)
    }

    fn preempt(&mut self, id: SeqId) {
        self.preemptions += 1;
        let s = self.seqs.get_mut(&id).expect("known id");
        s.preemptions += 1;
        leave(&mut self.blocks, s);
        self.running.retain(|&r| r != id);
        self.insert_ordered(false, id);
    }

    fn insert_ordered(&mut self, running: bool, id: SeqId) {
        let key = (self.seqs[&id].arrival, id);
        let seqs = &self.seqs;
        let list = if running {
            &mut self.running
        } else {
            &mut self.waiting
        };
        let pos = list.partition_point(|o| (seqs[o].arrival, *o) < key);
        list.insert(pos, id);
    }
}

/// Releases the blocks of a sequence that leaves (removed or preempted), filing first the written positions
/// of the block after its last full one ([`BlockManager::remember_partial`]).
fn leave(blocks: &mut BlockManager, s: &mut Seq) {
    let bs = blocks.block_size();
    let full = s.block_keys.len();
    if s.written > full * bs && s.written < (full + 1) * bs && s.table.len() > full {
        blocks.remember_partial(
            s.table[full],
            s.block_keys.last(),
            &s.keys[full * bs..s.written],
        );
    }
    s.computed = 0;
    s.written = 0;
    s.block_keys.clear();
    blocks.release_all(&mut s.table);
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
