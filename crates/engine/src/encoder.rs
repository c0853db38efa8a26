//! The encoder thread: runs the audio path (encoder, RoTE, projector) for the audio parts the embedding
//! cache did not have, in batches of windows, reports progress, fills the cache, and hands the request to
//! the step loop.

use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use afnext_model::AfNext;
use candle_core::{Device, Tensor};

use crate::cache::AudioEmbeds;
use crate::engine::{AudioInput, Event, Job, Shared};
use crate::error::{EngineError, Result};
use crate::worker::{Command, Ready};

pub(crate) struct EncoderThread {
    pub model: Arc<AfNext>,
    pub shared: Arc<Shared>,
    pub batch: usize,
    pub loop_tx: std_mpsc::Sender<Command>,
}

impl EncoderThread {
    pub fn run(self, rx: std_mpsc::Receiver<Job>) {
        while let Ok(mut job) = rx.recv() {
            let t0 = Instant::now();
            match self.encode(&mut job) {
                Ok(audio) => {
                    job.encode_time = t0.elapsed();
                    let _ = self.loop_tx.send(Command::Add(Box::new(Ready {
                        job,
                        audio,
                        stream: None,
                    })));
                }
                Err(e) => {
                    let _ = job.tx.send(Event::Failed(e));
                }
            }
        }
    }

    /// All audio rows of the request in prompt order (`None` without audio).
    fn encode(&self, job: &mut Job) -> Result<Option<Tensor>> {
        let total: usize = job
            .audios
            .iter()
            .map(|a| match a {
                AudioInput::Pending { features, .. } => features
                    .plan
                    .windows
                    .iter()
                    .filter(|w| w.tokens > 0)
                    .count(),
                AudioInput::Cached(_) => 0,
            })
            .sum();
        let mut done = 0;
        let mut rows = Vec::with_capacity(job.audios.len());
        for input in std::mem::take(&mut job.audios) {
            let (key, f, seconds) = match input {
                AudioInput::Cached(e) => {
                    rows.push(e.rows.clone());
                    continue;
                }
                AudioInput::Pending {
                    key,
                    features,
                    seconds,
                } => (key, features, seconds),
            };
            // Another request may have encoded the same audio meanwhile.
            if let Some(hit) = self.shared.cache(|c| c.recheck(&key)) {
                rows.push(hit.rows.clone());
                continue;
            }
            let mut parts = Vec::new();
            let wl = f.n_mels * f.frames;
            // Only the last window can yield no token (spec quirk 7); it adds no row, so it is not encoded.
            let windows: Vec<_> = f
                .plan
                .windows
                .iter()
                .filter(|w| w.tokens > 0)
                .copied()
                .collect();
            for chunk in windows.chunks(self.batch) {
                self.check(job)?;
                let first = chunk[0].index;
                let data = f.features[first * wl..(first + chunk.len()) * wl].to_vec();
                let x = Tensor::from_vec(data, (chunk.len(), f.n_mels, f.frames), &Device::Cpu)
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                let valid: Vec<usize> = chunk.iter().map(|w| w.valid_frames).collect();
                let idx: Vec<usize> = chunk.iter().map(|w| w.index).collect();
                let stages = self.model.encode_windows(&x, &valid, &idx)?;
                parts.push(stages.embeddings()?);
                done += chunk.len();
                self.shared
                    .windows_encoded
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let _ = job.tx.send(Event::EncodeProgress {
                    windows_done: done,
                    windows_total: total,
                });
            }
            let audio = Tensor::cat(&parts, 0).map_err(|e| EngineError::Internal(e.to_string()))?;
            let e = Arc::new(AudioEmbeds {
                tokens: audio
                    .dim(0)
                    .map_err(|e| EngineError::Internal(e.to_string()))?,
                rows: audio.clone(),
                windows: f.plan.windows.len(),
                seconds,
            });
            self.shared.cache(|c| c.insert(key, e));
            rows.push(audio);
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let all = Tensor::cat(&rows, 0).map_err(|e| EngineError::Internal(e.to_string()))?;
        // On a GPU each thread's kernels run on its own stream: the step loop may read these rows only
        // after this thread's stream has written them (a no-op on the CPU).
        all.device()
            .synchronize()
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(Some(all))
    }

    fn check(&self, job: &Job) -> Result<()> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        if job.cancelled() {
            return Err(EngineError::Cancelled);
        }
        if job.expired(Instant::now()) {
            return Err(EngineError::DeadlineExceeded);
        }
        Ok(())
    }
}
