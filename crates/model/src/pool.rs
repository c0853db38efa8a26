//! Running a whole CPU forward pass on a worker of rayon's pool.
//!
//! Every parallel kernel of a CPU forward (the GEMM's panel tasks, the attention's head tasks) is a rayon
//! job. Called from a thread outside the pool (the engine's step thread, the CLI's main thread), each one is
//! injected into the pool, wakes a sleeping worker with a futex and puts the caller to sleep until it is done:
//! a decode step of a 24-layer decoder makes ~200 such hand-offs, and they were ~10 % of its time
//! (`step_probe`, batch 1, bf16: layers 40 -> 35.5 ms). Run from a worker instead, the caller splits the
//! work itself and starts on its share at once; an idle worker steals the rest when it wakes.
//!
//! Only for a group of one: a tensor-parallel rank blocks in its collectives, and ranks that share a process
//! (and its pool) must not park each other's workers.

/// Runs `f` on a worker of rayon's global pool (on this thread if it is one already), when `whole` (no
/// group to wait on, see the module documentation); otherwise on this thread.
pub(crate) fn on_pool<R: Send>(whole: bool, f: impl FnOnce() -> R + Send) -> R {
    if !whole || rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::on_pool;

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
}
