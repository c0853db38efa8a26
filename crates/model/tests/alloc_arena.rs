//! `retain_freed_memory` keeps freed memory for the next step on every thread, not only the main one: on a
//! thread of its own (as rayon's workers are), two rounds of large buffers that do not fit one of glibc's
//! 64 MiB thread heaps together must not fault their pages in again in the second round. A plain `main` (no
//! test harness), because the settings only hold for threads that allocate after they are made.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    assert!(afnext_model::alloc::retain_freed_memory());
    let faults = std::thread::spawn(|| {
        // Minor page faults of this thread so far.
        let minflt = || {
            // SAFETY: getrusage writes the struct it is given.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
            ru.ru_minflt
        };
        let round = || {
            let before = minflt();
            // 48 + 40 MiB alive at once, written as a step writes its products.
            let a = vec![1u8; 48 << 20];
            let b = vec![2u8; 40 << 20];
            std::hint::black_box((&a, &b));
            minflt() - before
        };
        (round(), round(), round())
    })
    .join()
    .unwrap();
    println!("minor page faults per round: {faults:?}");
    let (first, _, third) = faults;
    // The first round faults every page in (22 528 of 4 KiB); later rounds reuse them.
    assert!(
        first > 10_000,
        "the first round should fault its pages in: {faults:?}"
    );
    assert!(
        third * 20 < first,
        "freed memory went back to the system between rounds: {faults:?}"
    );
    println!("ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}
