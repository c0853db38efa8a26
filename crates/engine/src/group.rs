//! Running the decoder as a tensor-parallel group: rank 0 runs the engine and, every step, tells the other
//! ranks what to run ([`GroupMsg`] over the group's broadcast); every rank then runs the same
//! [`Qwen2::run_step`] on its share, and the collectives inside it keep them in lockstep.
//!
//! Failure: a collective error means a rank died or stalled. Rank 0 fails everything in flight with
//! [`EngineError::GroupLost`] (UNAVAILABLE), refuses new requests, and reports itself not ready and not
//! live, so the router stops routing there and an orchestrator restarts the group. While idle, rank 0 pings
//! the group every [`PING_EVERY`], so a dead rank is noticed without traffic. A follower whose rank 0 is gone
//! exits with an error.

use std::sync::Arc;
use std::time::Duration;

use afnext_collectives::Collective;
use afnext_model::decoder::Qwen2;
use afnext_model::paged::PagedKv;
use afnext_model::tp::{GroupMsg, StepPlan};
use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};

/// How often an idle rank 0 checks that every rank is alive.
pub const PING_EVERY: Duration = Duration::from_secs(1);

/// Rank 0's side of a group of more than one rank.
#[derive(Debug)]
pub(crate) struct Ranks {
    group: Arc<dyn Collective>,
}

fn lost(e: impl std::fmt::Display) -> EngineError {
    EngineError::GroupLost(e.to_string())
}

impl Ranks {
    /// `None` for a group of one (nothing to tell anyone).
    pub fn of(decoder: &Qwen2) -> Option<Self> {
        let g = decoder.group();
        (g.world_size() > 1).then(|| Ranks { group: g.clone() })
    }

    fn send(&self, m: &GroupMsg) -> Result<()> {
        self.group.broadcast(0, m.encode()).map(drop).map_err(lost)
    }

    pub fn init(&self, kv: &PagedKv) -> Result<()> {
        self.send(&GroupMsg::Init {
            num_blocks: kv.num_blocks(),
            block_size: kv.block_size(),
            attn_block: kv.attn_block(),
        })
    }

    pub fn step(&self, plan: &StepPlan, audio: Option<&Tensor>, trace: String) -> Result<()> {
        let audio = match audio {
            Some(a) => a
                .to_dtype(DType::F32)
                .and_then(|a| a.flatten_all())
                .and_then(|a| a.to_vec1())
                .map_err(|e| EngineError::Model(e.into()))?,
            None => Vec::new(),
        };
        self.send(&GroupMsg::Step {
            plan: plan.clone(),
            audio,
            trace,
        })
    }

    /// Every rank answers, or the group is lost.
    pub fn ping(&self) -> Result<()> {
        self.send(&GroupMsg::Ping)?;
        let mut one = [1f32];
        self.group.all_reduce_sum(&mut one).map_err(lost)?;
        if one[0] != self.group.world_size() as f32 {
            return Err(lost(format!("ping summed to {}", one[0])));
        }
        Ok(())
    }

    pub fn stop(&self) {
        let _ = self.send(&GroupMsg::Stop);
    }
}

/// A follower rank (1..world): runs whatever rank 0 says until it says stop (`Ok`) or the group fails.
pub fn run_follower(decoder: &Qwen2) -> Result<()> {
    let group = decoder.group().clone();
    if group.rank() == 0 {
        return Err(EngineError::Internal(
            "rank 0 runs the engine, not the follower loop".into(),
        ));
    }
    let local = decoder.local_config().clone();
    let hidden = decoder.config().hidden_size;
    let (dtype, device) = decoder.dtype_device();
    let mut kv: Option<PagedKv> = None;
    loop {
        let msg = GroupMsg::decode(&group.broadcast(0, Vec::new()).map_err(lost)?)?;
        match msg {
            GroupMsg::Init {
                num_blocks,
                block_size,
                attn_block,
            } => {
                kv = Some(
                    PagedKv::new(&local, num_blocks, block_size, dtype, &device)?
                        .with_attn_block(attn_block),
                );
            }
            GroupMsg::Step { plan, audio, trace } => {
                let span = afnext_telemetry::span_from("decoder.follower_step", &trace);
                let _entered = span.enter();
                let kv = kv.as_ref().ok_or_else(|| {
                    EngineError::Internal("rank 0 sent a step before the cache size".into())
                })?;
                let audio = if audio.is_empty() {
                    None
                } else {
                    let n = audio.len() / hidden;
                    Some(
                        Tensor::from_vec(audio, (n, hidden), &device)
                            .map_err(|e| EngineError::Model(e.into()))?,
                    )
                };
                decoder.run_step(&plan, audio.as_ref(), kv)?;
            }
            GroupMsg::Ping => {
                let mut one = [1f32];
                group.all_reduce_sum(&mut one).map_err(lost)?;
            }
            GroupMsg::Stop => return Ok(()),
        }
    }
}
