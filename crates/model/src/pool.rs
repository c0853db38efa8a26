//! Running a whole CPU forward pass on a worker of rayon's pool.
//!
//! Every parallel kernel of a CPU forward (the GEMM's panel tasks, the attention's head tasks) is a rayon
//! job. Called from a thread outside the pool (the engine's step thread, the CLI's main thread), each one is
//! injected into the pool, wakes a sleeping worker with a futex and puts the caller to sleep until it is done:
//! a decode step of a 24-layer decoder makes ~200 such hand-offs, and they were ~10 % of its time
//! (`step_probe`, batch 1, bf16: layers 40 -> 35.5 ms). Run from a worker instead, the caller splits the
//! work itself and starts on its share at once; an idle worker steals the rest when it wakes. For the length
//! of the pass the other workers are kept awake ([`KeepAwake`]), so that they need no waking at all.
//!
//! Only for a group of one: a tensor-parallel rank blocks in its collectives, and ranks that share a process
//! (and its pool) must not park each other's workers.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `f` on a worker of rayon's global pool (on this thread if it is one already), when `whole` (no
/// group to wait on, see the module documentation); otherwise on this thread.
pub(crate) fn on_pool<R: Send>(whole: bool, f: impl FnOnce() -> R + Send) -> R {
    if !whole || rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| {
        let _awake = KeepAwake::start();
        f()
    })
}

/// Keeps the pool's other workers looking for work until dropped (the end of a forward pass, or its
/// unwinding): each runs a job that executes whatever rayon work it finds and spins while there is none.
///
/// Between two parallel kernels of a forward pass (a norm, a residual add: a few microseconds) an idle
/// worker yields a few dozen times and then sleeps on a futex; the next kernel's tasks then wait for it to be
/// woken, and a kernel whose tasks finish unevenly puts the caller to sleep in turn. A decode step of 16
/// rows made ~130 such context switches (`perf stat`), and its layers took 76 ms against 67 ms with the
/// workers kept awake (`step_probe bf16 16`; batch 1: ~5 %). The spinning costs nothing a forward pass could
/// use: it is CPU-bound on every worker anyway.
///
/// The spinning jobs are not scoped: the forward pass returns without waiting for them, so a worker busy
/// with unrelated work when it ends (a job of the encoder thread it picked up) does not hold the step up.
struct KeepAwake(Arc<Spin>);

/// How long a spinning job looks for work in vain before it ends (its worker then sleeps as rayon's
/// workers do). A job runs on whatever its worker was doing, and rayon runs jobs inside waits: a worker
/// waiting in a join within one of the pass's own tasks may pick its spinning job up, and that task cannot
/// finish beneath a job that lasts as long as the pass. Then nobody finds work, and this bound ends the wait.
/// One such hang was seen in the golden tests before the bound (parallel tests, two passes at once); the
/// unit test of concurrent passes with nested joins did not reproduce it, the race being narrow. The gaps
/// between a pass's kernels are microseconds.
const MAX_IDLE: Duration = Duration::from_millis(1);

thread_local! {
    /// This thread is running a spinning job.
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

#[derive(Default)]
struct Spin {
    done: AtomicBool,
    /// Spinning jobs running now.
    live: AtomicUsize,
}

impl KeepAwake {
    fn start() -> Self {
        let spin = Arc::new(Spin::default());
        let caller = rayon::current_thread_index();
        let s = spin.clone();
        rayon::spawn_broadcast(move |ctx| {
            // Not on the caller, and not within another spinning job (it keeps this worker busy already).
            if Some(ctx.index()) == caller || SPINNING.get() {
                return;
            }
            SPINNING.set(true);
            s.live.fetch_add(1, Ordering::AcqRel);
            // The clock is read once per 1024 idle rounds (a read per round slowed the pass it serves).
            let (mut idle_rounds, mut idle_since) = (0u32, None);
            while !s.done.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    (idle_rounds, idle_since) = (0, None);
                    continue;
                }
                idle_rounds = idle_rounds.wrapping_add(1);
                if idle_rounds % 1024 == 0
                    && idle_since.get_or_insert_with(Instant::now).elapsed() > MAX_IDLE
                {
                    break;
                }
                std::hint::spin_loop();
            }
            s.live.fetch_sub(1, Ordering::AcqRel);
            SPINNING.set(false);
        });
        KeepAwake(spin)
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::{on_pool, KeepAwake, Ordering};
    use rayon::prelude::*;

    #[test]
    fn runs_on_a_worker_only_for_a_group_of_one() {
        assert!(rayon::current_thread_index().is_none(), "a test thread");
        assert!(on_pool(true, || rayon::current_thread_index().is_some()));
        assert!(!on_pool(false, || rayon::current_thread_index().is_some()));
        // Already on a worker: runs there, without another hand-off.
        let nested = on_pool(true, || {
            let outer = rayon::current_thread_index();
            on_pool(true, || rayon::current_thread_index() == outer)
        });
        assert!(nested);
    }

    #[test]
    fn the_workers_kept_awake_stop_spinning_when_released() {
        let awake = KeepAwake::start();
        let spin = awake.0.clone();
        // Work done meanwhile is picked up by the spinning workers.
        let sum: u64 = (0..10_000u64).into_par_iter().sum();
        assert_eq!(sum, 9_999 * 10_000 / 2);
        // Called from outside the pool: every worker spins. Bounded waits for liveness, not timings (a
        // worker may first finish another test's job).
        let wait = |what: &str, until: &dyn Fn(usize) -> bool| {
            let t = std::time::Instant::now();
            while !until(spin.live.load(Ordering::Acquire)) {
                assert!(t.elapsed().as_secs() < 60, "{what}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        wait("no worker started spinning", &|live| live > 0);
        drop(awake);
        wait("workers still spinning", &|live| live == 0);
    }

    #[test]
    fn concurrent_passes_with_nested_parallel_work_finish() {
        // Passes started from several threads at once (tests in parallel, the CLI beside a server), each
        // with joins nested in its parallel work, as the attention's kernels have. A worker waiting in such a
        // join may pick up another pass's spinning job; if that job only ended with its pass, and the pass
        // needed the join's work beneath it, nothing would finish.
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..8u64 {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut total = 0u64;
                for i in 0..2000u64 {
                    total += on_pool(true, || {
                        (0..8u64)
                            .into_par_iter()
                            .map(|j| {
                                (0..64u64)
                                    .into_par_iter()
                                    .map(|x| x ^ (i + j + t))
                                    .sum::<u64>()
                            })
                            .sum::<u64>()
                    });
                }
                tx.send(total).unwrap();
            });
        }
        drop(tx);
        for _ in 0..8 {
            // A bounded wait for liveness, not a timing.
            let got = rx.recv_timeout(std::time::Duration::from_secs(120));
            assert!(got.is_ok(), "concurrent passes did not finish: {got:?}");
        }
    }

    #[test]
    fn a_panicking_forward_releases_the_workers() {
        let r = std::panic::catch_unwind(|| on_pool(true, || panic!("forward failed")));
        assert!(r.is_err());
        // The pool still runs work, and a later pass keeps its workers awake and releases them again.
        let sum: u64 = on_pool(true, || (0..1000u64).into_par_iter().sum());
        assert_eq!(sum, 999 * 1000 / 2);
    }
}
