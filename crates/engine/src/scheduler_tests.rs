//! Scheduler tests against a simulated model: the "model" picks the next token as a hash of the whole
//! sequence so far, so any scheduling mistake (a position skipped, computed twice, or a token lost across a
//! preemption) changes the outputs.

use std::time::{Duration, Instant};

use super::*;

fn fake_next(keys: &[u64]) -> u32 {
    let mut h = blake3::Hasher::new();
    for k in keys {
        h.update(&k.to_le_bytes());
    }
    let b = h.finalize();
    1000 + (u32::from_le_bytes(b.as_bytes()[..4].try_into().unwrap()) % 1000)
}

struct Req {
    arrive_at: usize,
    prompt: Vec<u64>,
    max_new: usize,
}

struct Outcome {
    outputs: HashMap<SeqId, Vec<u32>>,
    steps: usize,
    preemptions: u64,
    /// Per step: ids that were decoding (remaining 1) before the step and were not scheduled.
    skipped_decodes: usize,
    cached: HashMap<SeqId, usize>,
}

fn prompt(seed: u64, len: usize) -> Vec<u64> {
    (0..len as u64)
        .map(|i| (seed * 7919 + i * 31) % 997)
        .collect()
}

fn run(cfg: SchedulerConfig, blocks: usize, bs: usize, reqs: &[Req]) -> Outcome {
    cfg.validate().unwrap();
    let mut s = Scheduler::new(cfg.clone(), BlockManager::new(blocks, bs));
    let t0 = Instant::now();
    let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    // The model's view of each sequence: every token whose KV is "computed", checked for continuity.
    let mut seen: HashMap<SeqId, Vec<u64>> = HashMap::new();
    let mut all_keys: HashMap<SeqId, Vec<u64>> = HashMap::new();
    let mut done = 0;
    let mut step_no = 0;
    let mut skipped = 0;
    let mut cached = HashMap::new();
    // What the simulated KV pool holds in each slot: the key of the position last written there.
    let mut pool: Vec<Option<u64>> = vec![None; blocks * bs];
    while done < reqs.len() {
        for (i, r) in reqs.iter().enumerate() {
            if r.arrive_at == step_no {
                s.add(SeqSpec {
                    id: i as SeqId,
                    keys: r.prompt.clone(),
                    max_new_tokens: r.max_new,
                    arrival: t0 + Duration::from_millis(step_no as u64),
                    deadline: None,
                })
                .unwrap();
                all_keys.insert(i as SeqId, r.prompt.clone());
            }
        }
        let decoding: Vec<SeqId> = s
            .running
            .iter()
            .copied()
            .filter(|id| s.seqs[id].decoding())
            .collect();
        let step = s.schedule(t0 + Duration::from_millis(step_no as u64));
        assert!(step.tokens() <= cfg.max_batch_tokens, "budget exceeded");
        for (id, c) in &step.admitted {
            cached.insert(*id, *c);
        }
        for d in decoding {
            if !step.items.iter().any(|it| it.id == d) && !step.preempted.contains(&d) {
                skipped += 1;
            }
        }
        for id in &step.preempted {
            seen.remove(id);
        }
        for c in &step.copies {
            let (from, to) = (c.src as usize * bs, c.dst as usize * bs);
            for i in 0..c.rows {
                pool[to + i] = pool[from + i];
            }
        }
        for it in &step.items {
            let keys = &all_keys[&it.id];
            let view = seen.entry(it.id).or_default();
            if view.len() != it.start {
                // Positions below `start` came from the prefix cache (whole blocks, then rows copied).
                assert!(view.is_empty(), "gap before {it:?}");
                view.extend_from_slice(&keys[..it.start]);
            }
            view.extend_from_slice(&keys[it.start..it.start + it.len]);
            assert!(
                it.block_table.len() * bs >= it.start + it.len,
                "table too short"
            );
            // The context the step attends to is this sequence's own, in its blocks' slots.
            let slot = |p: usize| it.block_table[p / bs] as usize * bs + p % bs;
            for (p, k) in keys[..it.start].iter().enumerate() {
                assert_eq!(pool[slot(p)], Some(*k), "position {p} of {it:?}");
            }
            for p in it.start..it.start + it.len {
                pool[slot(p)] = Some(keys[p]);
            }
        }
        s.complete(&step.items);
        for it in step.items.iter().filter(|it| it.sample) {
            let keys = all_keys.get_mut(&it.id).unwrap();
            let tok = fake_next(keys);
            let out = outputs.entry(it.id).or_default();
            out.push(tok);
            if out.len() == reqs[it.id as usize].max_new {
                assert!(s.remove(it.id));
                done += 1;
            } else {
                s.append(it.id, tok);
                keys.push(u64::from(tok));
            }
        }
        step_no += 1;
        assert!(step_no < 100_000, "no progress");
    }
    let st = s.stats();
    assert_eq!(st.blocks.used, 0, "blocks leaked");
    assert!(s.copy_sources.is_empty(), "copy sources still held");
    assert!(s.is_idle());
    Outcome {
        outputs,
        steps: step_no,
        preemptions: st.preemptions,
        skipped_decodes: skipped,
        cached,
    }
}

fn mixed_requests(n: usize) -> Vec<Req> {
    (0..n)
        .map(|i| Req {
            arrive_at: i * 2,
            prompt: prompt(i as u64, 20 + (i * 37) % 90),
            max_new: 5 + (i * 13) % 30,
        })
        .collect()
}

fn cfg(budget: usize, running: usize, chunk: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: budget,
        max_running: running,
        max_waiting: 1000,
        prefill_chunk: chunk,
    }
}

#[test]
fn budget_respected_and_everything_finishes_without_leaks() {
    let reqs = mixed_requests(24);
    let out = run(cfg(48, 8, 16), 200, 4, &reqs);
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(out.outputs[&(i as SeqId)].len(), r.max_new);
    }
    assert_eq!(out.preemptions, 0);
}

#[test]
fn preemption_and_resume_give_identical_tokens() {
    let reqs = mixed_requests(16);
    let roomy = run(cfg(64, 8, 32), 1000, 4, &reqs);
    // 40 blocks of 4 cannot hold 8 sequences of up to ~140 positions: sequences get preempted.
    let tight = run(cfg(64, 8, 32), 40, 4, &reqs);
    assert!(
        tight.preemptions > 0,
        "the tight cache must force preemption"
    );
    assert_eq!(roomy.outputs, tight.outputs);
}

#[test]
fn long_prefill_does_not_starve_decodes_and_advances_every_step() {
    let mut reqs: Vec<Req> = (0..6)
        .map(|i| Req {
            arrive_at: 0,
            prompt: prompt(i, 8),
            max_new: 60,
        })
        .collect();
    reqs.push(Req {
        arrive_at: 3,
        prompt: prompt(99, 2000),
        max_new: 3,
    });
    let out = run(cfg(40, 8, 64), 1000, 8, &reqs);
    assert_eq!(out.skipped_decodes, 0, "a decoding sequence missed a step");
    // The 2000-token prompt advances by at least budget - 6 decodes = 34 positions per step.
    assert!(out.steps < 3 + 2000 / 34 + 10, "{} steps", out.steps);
}

#[test]
fn a_large_request_at_the_head_is_not_overtaken_forever() {
    // Small cache: the big request must wait for blocks, and later small ones must not jump ahead of it.
    let mut reqs = vec![Req {
        arrive_at: 0,
        prompt: prompt(1, 30),
        max_new: 40,
    }];
    reqs.push(Req {
        arrive_at: 1,
        prompt: prompt(2, 100),
        max_new: 10,
    });
    for i in 0..20 {
        reqs.push(Req {
            arrive_at: 2 + i,
            prompt: prompt(10 + i as u64, 4),
            max_new: 4,
        });
    }
    let out = run(cfg(32, 4, 16), 30, 4, &reqs);
    assert_eq!(out.outputs[&1].len(), 10);
}

#[test]
fn follow_up_prompts_take_cached_blocks() {
    let p = prompt(5, 37);
    let mut longer = p.clone();
    longer.extend(prompt(6, 10));
    let reqs = vec![
        Req {
            arrive_at: 0,
            prompt: p.clone(),
            max_new: 3,
        },
        Req {
            arrive_at: 20,
            prompt: p,
            max_new: 3,
        },
        Req {
            arrive_at: 40,
            prompt: longer,
            max_new: 3,
        },
    ];
    let out = run(cfg(64, 4, 64), 100, 8, &reqs);
    assert_eq!(out.cached[&0], 0);
    // 37 positions: 4 full blocks (32) and 4 positions of the fifth block, which the first request left
    // partial (copied); the last position is always computed.
    assert_eq!(out.cached[&1], 36);
    // The same 37 positions (the fifth block's 5 first ones), then other tokens.
    assert_eq!(out.cached[&2], 37);
    assert_eq!(out.outputs[&0], out.outputs[&1]);
}

#[test]
fn prompts_sharing_part_of_a_block_copy_its_rows() {
    let p = prompt(5, 40);
    // The first 29 positions of `p` (3 full blocks of 8 and 5 positions of the fourth), then others.
    let mut part = p[..29].to_vec();
    part.extend(prompt(6, 16));
    // Shares 3 positions of `p`'s first block only.
    let mut early = p[..3].to_vec();
    early.extend(prompt(7, 9));
    let reqs = vec![
        Req {
            arrive_at: 0,
            prompt: p,
            max_new: 2,
        },
        Req {
            arrive_at: 20,
            prompt: part.clone(),
            max_new: 4,
        },
        Req {
            arrive_at: 40,
            prompt: early.clone(),
            max_new: 4,
        },
    ];
    let out = run(cfg(64, 4, 64), 100, 8, &reqs);
    assert_eq!(out.cached[&0], 0);
    assert_eq!(out.cached[&1], 29, "3 blocks and 5 copied positions");
    assert_eq!(out.cached[&2], 3, "3 copied positions of a first block");
    // The same requests alone (nothing cached) give the same tokens.
    for (id, prompt) in [(1, part), (2, early)] {
        let alone = run(
            cfg(64, 4, 64),
            100,
            8,
            &[Req {
                arrive_at: 0,
                prompt,
                max_new: 4,
            }],
        );
        assert_eq!(alone.cached[&0], 0);
        assert_eq!(alone.outputs[&0], out.outputs[&id]);
    }
}

#[test]
fn a_follow_up_copies_the_last_partial_block_of_the_turn_before() {
    let p = prompt(5, 37);
    let first = Req {
        arrive_at: 0,
        prompt: p.clone(),
        max_new: 3,
    };
    let answer = run(cfg(64, 4, 64), 100, 8, std::slice::from_ref(&first)).outputs[&0].clone();
    // The follow-up repeats the prompt and the answer (3 tokens, the last never computed), then asks more.
    let mut follow = p;
    follow.extend(answer.iter().map(|&t| u64::from(t)));
    follow.extend(prompt(6, 5));
    let out = run(
        cfg(64, 4, 64),
        100,
        8,
        &[
            first,
            Req {
                arrive_at: 20,
                prompt: follow,
                max_new: 3,
            },
        ],
    );
    assert_eq!(out.outputs[&0], answer);
    // 39 positions written by the first turn: 4 full blocks and 7 positions of the fifth, which it left
    // partial; all of them are found.
    assert_eq!(out.cached[&1], 39);
}

#[test]
fn a_copy_source_stays_referenced_until_the_step_has_run() {
    let mut s = Scheduler::new(cfg(64, 4, 64), BlockManager::new(8, 4));
    let t0 = Instant::now();
    let add = |s: &mut Scheduler, id: SeqId, keys: Vec<u64>| {
        s.add(SeqSpec {
            id,
            keys,
            max_new_tokens: 2,
            arrival: t0,
            deadline: None,
        })
        .unwrap();
    };
    add(&mut s, 1, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let step = s.schedule(t0);
    assert!(step.copies.is_empty());
    s.complete(&step.items);
    let donor = step.items[0].block_table[1];
    assert!(s.remove(1));
    assert_eq!(s.blocks().ref_count(donor), 0, "cached, evictable");
    // Shares the first block and 2 positions of the second.
    add(&mut s, 2, vec![1, 2, 3, 4, 5, 6, 9, 9, 9]);
    let step = s.schedule(t0);
    assert_eq!(step.admitted, vec![(2, 6)]);
    let it = &step.items[0];
    assert_eq!((it.start, it.len), (6, 3));
    assert_eq!(
        step.copies,
        vec![BlockCopy {
            src: donor,
            dst: it.block_table[1],
            rows: 2
        }]
    );
    assert_ne!(it.block_table[1], donor, "copied into a block of its own");
    assert_eq!(s.blocks().ref_count(donor), 1, "held for the copy");
    assert_eq!(s.stats().blocks.partial_hits, 1);
    assert_eq!(s.stats().blocks.partial_positions, 2);
    s.complete(&step.items);
    assert_eq!(s.blocks().ref_count(donor), 0, "released once the step ran");
    // A step that failed (no `complete`) releases it at the next schedule.
    assert!(s.remove(2));
    add(&mut s, 3, vec![1, 2, 3, 4, 5, 6, 8, 8, 8]);
    let step = s.schedule(t0);
    assert_eq!(step.copies.len(), 1);
    let src = step.copies[0].src;
    let free = s.stats().blocks.free;
    assert!(s.remove(3));
    // Its copy was never done: the block it was for goes back empty, not filed as a partial block, and so
    // do the others after its first (a cached one).
    let table = step.items[0].block_table.len();
    assert_eq!(s.stats().blocks.free, free + table - 1);
    assert_eq!(s.blocks().ref_count(src), 1);
    let _ = s.schedule(t0);
    assert_eq!(s.blocks().ref_count(src), 0);
    assert_eq!(s.stats().blocks.used, 0, "blocks leaked");
}

#[test]
fn deadlines_expire_and_free_blocks() {
    let mut s = Scheduler::new(cfg(64, 4, 64), BlockManager::new(50, 4));
    let t0 = Instant::now();
    s.add(SeqSpec {
        id: 1,
        keys: prompt(1, 30),
        max_new_tokens: 10,
        arrival: t0,
        deadline: Some(t0 + Duration::from_millis(5)),
    })
    .unwrap();
    let step = s.schedule(t0);
    s.complete(&step.items);
    assert!(s.stats().blocks.used > 0);
    let step = s.schedule(t0 + Duration::from_millis(6));
    assert_eq!(step.expired, vec![1]);
    assert!(step.items.is_empty());
    assert_eq!(s.stats().blocks.used, 0);
}

#[test]
fn queue_limit_size_limit_and_removal() {
    let mut c = cfg(64, 1, 64);
    c.max_waiting = 1;
    let mut s = Scheduler::new(c, BlockManager::new(10, 4));
    let t0 = Instant::now();
    let spec = |id, len, max_new| SeqSpec {
        id,
        keys: prompt(id, len),
        max_new_tokens: max_new,
        arrival: t0,
        deadline: None,
    };
    assert_eq!(
        s.add(spec(9, 30, 20)),
        Err(AddError::TooLarge {
            needed: 50,
            capacity: 40
        })
    );
    s.add(spec(1, 10, 5)).unwrap();
    s.add(spec(2, 10, 5)).unwrap();
    assert_eq!(s.add(spec(3, 10, 5)), Err(AddError::QueueFull { limit: 2 }));
    let step = s.schedule(t0);
    assert_eq!(step.items.len(), 1, "one running, one waiting");
    assert_eq!(s.stats().waiting, 1);
    assert!(s.stats().blocks.used > 0);
    assert!(s.remove(1));
    assert!(s.remove(2));
    assert!(!s.remove(2));
    assert_eq!(s.stats().blocks.used, 0);
}

#[test]
fn config_validation_names_the_problem() {
    let e = cfg(8, 8, 4).validate().unwrap_err();
    assert!(e.contains("max_batch_tokens"), "{e}");
}

/// Streaming prefill: a prompt whose audio rows have not all arrived is prefilled up to the last ready
/// position, then waits without holding up others (also at admission), and goes on when more is ready.
#[test]
fn prefill_stops_at_the_ready_positions_without_holding_up_others() {
    let cfg = SchedulerConfig {
        max_batch_tokens: 64,
        max_running: 4,
        max_waiting: 8,
        prefill_chunk: 16,
    };
    let mut s = Scheduler::new(cfg, BlockManager::new(64, 4));
    let t0 = Instant::now();
    let spec = |id: SeqId, len: usize, at: u64| SeqSpec {
        id,
        keys: prompt(id, len),
        max_new_tokens: 4,
        arrival: t0 + Duration::from_millis(at),
        deadline: None,
    };
    // 0 has nothing ready yet, 1 has 10 of 40 positions, 2 (latest) is all text.
    s.add(spec(0, 20, 0)).unwrap();
    s.set_ready(0, 0);
    s.add(spec(1, 40, 1)).unwrap();
    s.set_ready(1, 10);
    s.add(spec(2, 8, 2)).unwrap();
    let st = s.schedule(t0);
    let got: Vec<(SeqId, usize, usize, bool)> = st
        .items
        .iter()
        .map(|i| (i.id, i.start, i.len, i.sample))
        .collect();
    assert_eq!(got, vec![(1, 0, 10, false), (2, 0, 8, true)]);
    s.complete(&st.items);
    s.append(2, 7);
    let st = s.schedule(t0);
    let got: Vec<(SeqId, usize, usize)> = st.items.iter().map(|i| (i.id, i.start, i.len)).collect();
    assert_eq!(
        got,
        vec![(2, 8, 1)],
        "1 waits for its audio, 0 is still not admitted"
    );
    s.complete(&st.items);
    s.set_ready(1, 40);
    s.set_ready(0, 20);
    let st = s.schedule(t0);
    let got: Vec<(SeqId, usize, usize)> = st.items.iter().map(|i| (i.id, i.start, i.len)).collect();
    assert_eq!(got, vec![(1, 10, 16), (0, 0, 16)]);
}
