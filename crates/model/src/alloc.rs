//! The process's memory allocator, for binaries that run the model on a CPU.
//!
//! Every step of the CPU model allocates its large buffers afresh (a bf16 prefill of 1 000 tokens: the MLP's
//! 19 MB f32 products, the projections' outputs, candle's tensors). glibc serves blocks above its mmap
//! threshold (dynamic, at most 32 MiB) with `mmap` and returns them with `munmap`, and gives the heap's free
//! top back to the system past its trim threshold, so those buffers were faulted in page by page on every
//! step: ~10 % of a bf16 prefill's CPU time went to the kernel's page faults (docs/PERFORMANCE.md).
//! [`retain_freed_memory`] raises both limits so freed blocks stay in the process for the next step. The
//! price is that the resident size stays near its peak (it would return there on the next long step anyway).
//!
//! It also keeps every thread on the main arena. glibc gives a thread that allocates while another holds the
//! main arena an arena of its own, made of heaps of at most 64 MiB; the forward passes run on rayon's
//! threads, and a prefill's large buffers (a 1 000-token f32 step's stacked MLP product alone is 39 MB) did
//! not fit those heaps together, so they were mapped and unmapped on every layer whatever the thresholds:
//! ~215 000 page faults (840 MB) per 1 000-token f32 prefill and 5.3 % of its CPU samples in the kernel;
//! on the main arena no page faults at all after the first prefill and 1.2 % in the kernel
//! (docs/PERFORMANCE.md, eleventh session). Small blocks still come from each thread's own cache (tcache)
//! without taking the arena's lock.

/// Blocks below this are served from the heap, and free memory at its top is kept up to this much.
pub const RETAIN_BYTES: i32 = 1 << 30;

/// Keeps freed memory in the process (glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` set to
/// [`RETAIN_BYTES`], `M_ARENA_MAX` to 1); call once at start, before the model's threads run. Returns whether the allocator took
/// the settings (false on other C libraries, where nothing is changed).
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; glibc serialises it with its own locks.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, RETAIN_BYTES) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, RETAIN_BYTES) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::retain_freed_memory());
        // Still a working allocator: a block above glibc's default mmap limit, written and freed twice.
        for _ in 0..2 {
            let v = vec![1u8; 64 << 20];
            assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
        }
    }
}
