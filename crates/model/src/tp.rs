//! Tensor parallelism of the decoder: how a rank's share is cut ([`TextShard`]) and what rank 0 tells the
//! other ranks each step ([`GroupMsg`]).
//!
//! Cut (Megatron style): q/k/v, gate and up are column-parallel (a rank holds whole attention heads and a
//! slice of the MLP), o and down are row-parallel with one all-reduce each, the embedding and the lm_head are
//! split by vocabulary (the embedding rows a rank does not hold are zeros before an all-reduce; the logits
//! slices are all-gathered).
//!
//! Key/value heads: with `tp` dividing `num_key_value_heads` each rank holds `kv / tp` of them. With fewer
//! kv heads than ranks (`tp` a multiple of `kv`), each kv head is *replicated* on `tp / kv` ranks, each
//! serving a different subset of that head's query heads. Anything else is refused with the reason. For
//! Qwen2.5-7B (28 query heads, 4 kv heads): TP 1, 2, 4 work (4 splits the kv heads one per rank); TP 8 is
//! refused, because 28 query heads do not split over 8 ranks (7 and 14 divide 28 but neither divides nor
//! is a multiple of 4). The MLP width and the vocabulary need not divide: their slices differ by at most one.

use std::ops::Range;

use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::paged::{BlockCopy, SeqStep};

/// One rank's share of the decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextShard {
    pub rank: usize,
    pub world: usize,
    /// Query heads of this rank.
    pub heads: Range<usize>,
    /// Key/value heads of this rank.
    pub kv_heads: Range<usize>,
    /// MLP intermediate features of this rank; ranks' slices differ by at most one feature when `world`
    /// does not divide the width.
    pub intermediate: Range<usize>,
    /// Vocabulary rows (embedding and lm_head) of this rank; ranks' slices differ by at most one row.
    pub vocab: Range<usize>,
}

impl TextShard {
    /// The whole decoder on one rank.
    pub fn whole(c: &TextConfig) -> Self {
        TextShard {
            rank: 0,
            world: 1,
            heads: 0..c.num_attention_heads,
            kv_heads: 0..c.num_key_value_heads,
            intermediate: 0..c.intermediate_size,
            vocab: 0..c.vocab_size,
        }
    }

    /// Rank `rank` of `world`, or an error saying why `world` cannot split this configuration.
    pub fn new(c: &TextConfig, rank: usize, world: usize) -> Result<Self> {
        let refuse = |problem: String| ModelError::Config {
            field: format!("tensor parallelism {world}"),
            problem,
        };
        if world == 0 || rank >= world {
            return Err(refuse(format!("has no rank {rank}")));
        }
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        if !nh.is_multiple_of(world) {
            return Err(refuse(format!(
                "does not divide num_attention_heads {nh}: each rank must hold whole query heads \
                 (use a divisor of {nh})"
            )));
        }
        let qpr = nh / world;
        let kv_heads = if nkv.is_multiple_of(world) {
            let k = nkv / world;
            rank * k..(rank + 1) * k
        } else if world.is_multiple_of(nkv) {
            // Replicated kv heads: query head i uses kv head i / (nh / nkv).
            let kv = rank * qpr / (nh / nkv);
            kv..kv + 1
        } else {
            return Err(refuse(format!(
                "neither divides nor is a multiple of num_key_value_heads {nkv}"
            )));
        };
        // The MLP and the vocabulary are cut at `r * n / world`: slices may differ by one (the down
        // projection's partial sums are all-reduced and the logits gathered, so widths need not match), but
        // every rank must hold at least one.
        let slice = |name: &str, n: usize| {
            if n < world {
                return Err(refuse(format!("exceeds {name} {n}")));
            }
            Ok(rank * n / world..(rank + 1) * n / world)
        };
        Ok(TextShard {
            rank,
            world,
            heads: rank * qpr..(rank + 1) * qpr,
            kv_heads,
            intermediate: slice("intermediate_size", c.intermediate_size)?,
            vocab: slice("vocab_size", c.vocab_size)?,
        })
    }

    /// The configuration this rank computes with: its head counts and MLP width (attention, the KV cache).
    pub fn local_config(&self, c: &TextConfig) -> TextConfig {
        TextConfig {
            num_attention_heads: self.heads.len(),
            num_key_value_heads: self.kv_heads.len(),
            intermediate_size: self.intermediate.len(),
            ..c.clone()
        }
    }
}

/// A row of a step taken from the audio embeddings instead of the token table.
pub const AUDIO_ROW: u32 = u32::MAX;

/// What every rank runs in one engine step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub seqs: Vec<SeqStep>,
    /// Token id of each row of the step, or [`AUDIO_ROW`] for the next row of the step's audio rows.
    pub ids: Vec<u32>,
    /// Rows whose logits are wanted, ascending.
    pub sample_rows: Vec<u32>,
    /// Rows copied between blocks of the KV cache before the forward (every rank its own shard).
    pub copies: Vec<BlockCopy>,
}

/// Rank 0's instruction to the other ranks of a group.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupMsg {
    /// Once, first: the paged KV cache every rank allocates (identical block ids on every rank).
    Init {
        num_blocks: usize,
        block_size: usize,
        attn_block: usize,
    },
    /// One step; `audio` holds the audio rows (`[n, hidden]`, f32, row-major) in the order of the
    /// [`AUDIO_ROW`] markers; `trace` is rank 0's step span as a W3C `traceparent` (empty: untraced).
    Step {
        plan: StepPlan,
        audio: Vec<f32>,
        trace: String,
    },
    /// A liveness check while idle: every rank answers with a one-value all-reduce.
    Ping,
    /// The group shuts down.
    Stop,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, x: usize) {
        self.0.extend_from_slice(&(x as u64).to_le_bytes());
    }
    fn u32s(&mut self, v: &[u32]) {
        self.u64(v.len());
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(ModelError::Input("truncated group message".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<usize> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")) as usize)
    }
    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.u64()?;
        Ok(self
            .take(
                n.checked_mul(4)
                    .ok_or_else(|| ModelError::Input("bad length".into()))?,
            )?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
}

impl GroupMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            GroupMsg::Init {
                num_blocks,
                block_size,
                attn_block,
            } => {
                w.0.push(1);
                w.u64(*num_blocks);
                w.u64(*block_size);
                w.u64(*attn_block);
            }
            GroupMsg::Step { plan, audio, trace } => {
                w.0.push(2);
                w.u64(trace.len());
                w.0.extend_from_slice(trace.as_bytes());
                w.u64(plan.seqs.len());
                for s in &plan.seqs {
                    w.u64(s.start);
                    w.u64(s.len);
                    w.u32s(&s.block_table);
                }
                w.u32s(&plan.ids);
                w.u32s(&plan.sample_rows);
                w.u64(plan.copies.len());
                for c in &plan.copies {
                    w.u32s(&[c.src, c.dst]);
                    w.u64(c.rows);
                }
                w.u64(audio.len());
                audio
                    .iter()
                    .for_each(|x| w.0.extend_from_slice(&x.to_le_bytes()));
            }
            GroupMsg::Ping => w.0.push(3),
            GroupMsg::Stop => w.0.push(4),
        }
        w.0
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader(b);
        let tag = r.take(1)?[0];
        let msg = match tag {
            1 => GroupMsg::Init {
                num_blocks: r.u64()?,
                block_size: r.u64()?,
                attn_block: r.u64()?,
            },
            2 => {
                let tn = r.u64()?;
                let trace = String::from_utf8(r.take(tn)?.to_vec())
                    .map_err(|_| ModelError::Input("trace context is not UTF-8".into()))?;
                let n = r.u64()?;
                let mut seqs = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    seqs.push(SeqStep {
                        start: r.u64()?,
                        len: r.u64()?,
                        block_table: r.u32s()?,
                    });
                }
                let ids = r.u32s()?;
                let sample_rows = r.u32s()?;
                let nc = r.u64()?;
                let mut copies = Vec::with_capacity(nc.min(4096));
                for _ in 0..nc {
                    let [src, dst] = r.u32s()?[..] else {
                        return Err(ModelError::Input("a block copy is two block ids".into()));
                    };
                    copies.push(BlockCopy {
                        src,
                        dst,
                        rows: r.u64()?,
                    });
                }
                let na = r.u64()?;
                let audio = r
                    .take(
                        na.checked_mul(4)
                            .ok_or_else(|| ModelError::Input("bad length".into()))?,
                    )?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                GroupMsg::Step {
                    plan: StepPlan {
                        seqs,
                        ids,
                        sample_rows,
                        copies,
                    },
                    audio,
                    trace,
                }
            }
            3 => GroupMsg::Ping,
            4 => GroupMsg::Stop,
            t => return Err(ModelError::Input(format!("unknown group message {t}"))),
        };
        if !r.0.is_empty() {
            return Err(ModelError::Input(
                "trailing bytes in a group message".into(),
            ));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nh: usize, nkv: usize) -> TextConfig {
        TextConfig {
            vocab_size: 390,
            hidden_size: nh * 16,
            intermediate_size: 128,
            num_hidden_layers: 1,
            num_attention_heads: nh,
            num_key_value_heads: nkv,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            eos_token_id: vec![],
            pad_token_id: None,
        }
    }

    #[test]
    fn shards_cover_everything_once_and_refusals_say_why() {
        for (nh, nkv, world, inter) in [
            (4, 2, 2, 128),
            (4, 2, 4, 128),
            (28, 4, 4, 128),
            (28, 4, 2, 67),
            (8, 8, 8, 128),
            (3, 1, 3, 67),
            (4, 2, 4, 131),
        ] {
            let mut c = cfg(nh, nkv);
            c.intermediate_size = inter;
            let shards: Vec<_> = (0..world)
                .map(|r| TextShard::new(&c, r, world).unwrap())
                .collect();
            let heads: Vec<usize> = shards.iter().flat_map(|s| s.heads.clone()).collect();
            assert_eq!(heads, (0..nh).collect::<Vec<_>>());
            let vocab: Vec<usize> = shards.iter().flat_map(|s| s.vocab.clone()).collect();
            assert_eq!(vocab, (0..390).collect::<Vec<_>>());
            let inter: Vec<usize> = shards.iter().flat_map(|s| s.intermediate.clone()).collect();
            assert_eq!(inter, (0..c.intermediate_size).collect::<Vec<_>>());
            let widths: Vec<usize> = shards.iter().map(|s| s.intermediate.len()).collect();
            let (lo, hi) = (widths.iter().min().unwrap(), widths.iter().max().unwrap());
            assert!(hi - lo <= 1, "{nh} {nkv} {world} {widths:?}");
            for s in &shards {
                // Every query head of the rank has its kv head on the rank.
                for h in s.heads.clone() {
                    assert!(
                        s.kv_heads.contains(&(h / (nh / nkv))),
                        "{nh} {nkv} {world} {s:?}"
                    );
                }
            }
        }
        let mut c = cfg(3, 1);
        c.intermediate_size = 2;
        let e = TextShard::new(&c, 0, 3).unwrap_err().to_string();
        assert!(e.contains("exceeds intermediate_size 2"), "{e}");
        let e = TextShard::new(&cfg(28, 4), 0, 8).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads 28"), "{e}");
        let e = TextShard::new(&cfg(6, 2), 0, 3).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads 2"), "{e}");
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let m = GroupMsg::Step {
            plan: StepPlan {
                seqs: vec![SeqStep {
                    start: 3,
                    len: 2,
                    block_table: vec![7, 9],
                }],
                ids: vec![5, AUDIO_ROW],
                sample_rows: vec![1],
                copies: vec![BlockCopy {
                    src: 4,
                    dst: 9,
                    rows: 3,
                }],
            },
            audio: vec![0.5, -1.25],
            trace: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        };
        for m in [
            m,
            GroupMsg::Ping,
            GroupMsg::Stop,
            GroupMsg::Init {
                num_blocks: 10,
                block_size: 16,
                attn_block: 2048,
            },
        ] {
            let b = m.encode();
            assert_eq!(GroupMsg::decode(&b).unwrap(), m);
            assert!(GroupMsg::decode(&b[..b.len() - 1]).is_err() || b.len() == 1);
        }
        assert!(GroupMsg::decode(&[9]).is_err());
    }
}
