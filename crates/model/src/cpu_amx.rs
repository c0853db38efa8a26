//! bf16 products on Intel AMX tiles (`tdpbf16ps`), for bf16 models on CPUs that have them.
//!
//! With bf16 weights *and* bf16 activations (a bf16 model), the f32 kernel of [`crate::cpu_gemm`] spends most
//! of its time widening and multiplying in f32; an AMX tile instruction multiplies a 16 x 32 bf16 block by a
//! 32 x 16 one into 16 x 16 f32 accumulators. This is what torch (oneDNN) uses for bf16 on these CPUs.
//!
//! * Weights are packed once at load into panels of 32 output columns in AMX's pair layout
//!   (`[K/2][32][2]`, K padded to a multiple of 32 with zeros; the packing of [`crate::cpu_dpbf16`]).
//! * Activations are packed per call into tiles: `[M/16][K/32][16][32]` bf16 (rows padded to 16, zeros).
//! * Each task (a range of panels) configures the tiles (tmm0-1: two 16 x 16 f32 accumulators, tmm2: 16 rows x
//!   32 bf16 of x, tmm3-4: 16 pair-rows x 16 columns of W), walks its panels, and for every 16-row block
//!   accumulates over the whole K, then stores the valid rows and columns.
//! * Every output element is computed by the same instruction sequence whatever the number of rows (rows are
//!   always processed in padded blocks of 16), so batching does not change a request's numbers.
//!
//! The tile instructions are written with `asm!` (the AMX intrinsics are not stable in Rust). Linux grants the
//! tile state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); if the CPU or the kernel
//! says no, [`available`] is false and callers use `cpu_gemm`.

use std::sync::OnceLock;

use crate::cpu_gemm::{finish, par_panels, uninit_result, Epilogue, SyncPtr, NR};
use crate::page_buf::PageBuf;
use half::bf16;

const KB: usize = 32;
const MB: usize = 16;
/// L2 bytes for a group of weight panels in the many-rows order (half of a 2 MiB L2, the rest for the rows).
const GROUP_BYTES: usize = 1 << 20;

/// True when AMX-BF16 can be used by this process (checked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("AFNEXT_DISABLE_AMX").is_some() {
            return false;
        }
        imp::request()
    })
}

/// `W` `[n, k]` bf16 in AMX pair layout.
#[derive(Debug, Clone)]
pub struct AmxWeight {
    /// On huge pages where the system allows, as [`crate::cpu_gemm`]'s panels (see [`crate::page_buf`]).
    panels: PageBuf<u16>,
    n: usize,
    k: usize,
    kp: usize,
}

impl AmxWeight {
    pub fn pack(w: &[bf16], n: usize, k: usize) -> Self {
        let kp = k.div_ceil(KB) * KB;
        let panels = crate::cpu_dpbf16::pack_pairs(w, n, k, kp);
        AmxWeight { panels, n, k, kp }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }
    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// `y[m][n] = sum_k x[m][k] W[n][k] (+ bias)`, `x` bf16 `[m, k]`; f32 result. Call only if
    /// [`available`].
    pub fn matmul(&self, x: &[bf16], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "activation buffer size");
        let (n, k, kp) = (self.n, self.k, self.kp);
        let epilogue = Epilogue { bias, gelu: false };
        if m == 0 || n == 0 || k == 0 {
            let mut y = vec![0f32; m * n];
            finish(&SyncPtr(y.as_mut_ptr()), m, n, 0..n, epilogue);
            return y;
        }
        let mp = m.div_ceil(MB) * MB;
        // Tile order: row block, K step, then the block's 16 rows of 32 values (1 KiB), so each A tile
        // load reads one contiguous KiB (rows `kp` apart were 16 separate streams).
        let mut xp = vec![0u16; mp * kp];
        for (r, row) in x.chunks_exact(k).enumerate() {
            let block = &mut xp[(r / MB) * MB * kp..];
            for (ks, src) in row.chunks(KB).enumerate() {
                let at = ks * MB * KB + (r % MB) * KB;
                for (d, s) in block[at..at + src.len()].iter_mut().zip(src) {
                    *d = s.to_bits();
                }
            }
        }
        // Panels per group: a group's panels (bf16) stay in L2 while every pair of row blocks passes over them.
        let group = (GROUP_BYTES / (kp * NR * 2)).max(1);
        let task = |range: std::ops::Range<usize>, out: &SyncPtr| {
            let mut tmp = [0f32; 2 * MB * NR];
            // SAFETY: `available()` was checked by the caller (the tile state is granted); pointers and
            // strides stay inside `xp`, the panels and `tmp`; this task writes only its panels' columns.
            unsafe {
                imp::configure();
                for g in range.clone().step_by(group) {
                    // Two row blocks at a time (one when a single one is left): the pair's rows stay in
                    // cache across the group's panels, and each tile load feeds two tile products.
                    for rb in (0..mp).step_by(2 * MB) {
                        let pair = rb + MB < mp;
                        for p in g..(g + group).min(range.end) {
                            let panel = self.panels.as_ptr().add(p * kp * NR);
                            // The first rows stream the panel from memory; later ones find it in cache.
                            let stream = rb == 0;
                            let x = xp.as_ptr().add(rb * kp);
                            if pair {
                                imp::block2(x, kp, panel, tmp.as_mut_ptr(), stream);
                            } else {
                                imp::block(x, kp, panel, tmp.as_mut_ptr(), stream);
                            }
                            let cols = NR.min(n - p * NR);
                            for r in 0..(if pair { 2 * MB } else { MB }).min(m - rb) {
                                let dst = out.0.add((rb + r) * n + p * NR);
                                std::ptr::copy_nonoverlapping(tmp.as_ptr().add(r * NR), dst, cols);
                            }
                        }
                    }
                }
                imp::release();
            }
        };
        // SAFETY: every task copies all rows of each of its panels' valid columns into the result, and the
        // tasks cover all panels.
        unsafe { uninit_result(m, n, |out| par_panels(out, m, n, epilogue, task)) }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::{KB, MB, NR};
    use std::arch::asm;

    pub fn request() -> bool {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE (the detection macro is unstable for AMX).
        let l7 = std::arch::x86_64::__cpuid_count(7, 0);
        if l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
        const XFEATURE_XTILEDATA: u64 = 18;
        const SYS_ARCH_PRCTL: u64 = 158;
        let ret: i64;
        // SAFETY: a plain arch_prctl system call with integer arguments.
        unsafe {
            asm!("syscall",
                inlateout("rax") SYS_ARCH_PRCTL as i64 => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _, lateout("r11") _,
                options(nostack));
        }
        ret == 0
    }

    /// Eight tiles of 16 rows x 64 bytes. [`block`]: 0-1 C (16 x 16 f32), 2 A (16 x 32 bf16), 3-4 B (16
    /// pair-rows x 16 columns bf16); [`block2`]: 0-3 C, 4-5 A, 6-7 B.
    #[inline(always)]
    pub unsafe fn configure() {
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette
        for t in 0..8 {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            cfg[48 + t] = 16;
        }
        asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack));
    }

    #[inline(always)]
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// How far ahead of the tile loads the panel stream is prefetched (bytes; four K steps).
    const PREFETCH_AHEAD: usize = 8192;

    /// Prefetches the panel stream one K step's worth (16 pair-rows x 128 bytes) ahead of the step at `b`
    /// (the next panel follows it in memory; a prefetch past the allocation is harmless: it never faults).
    #[inline(always)]
    unsafe fn prefetch_step(b: *const u16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let ahead = (b as *const i8).wrapping_add(PREFETCH_AHEAD);
        for line in 0..(KB / 2) * NR * 2 * 2 / 64 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
        }
    }

    /// One 16 x 32 block of C over the whole (padded) K: `x` one packed row block (`kp / 32` tiles of 16 x 32
    /// bf16), `panel` `[kp/2][32][2]`, result stored to `c` `[16][32]` f32. With `stream` (the panel comes
    /// from memory: decode steps, the first row block) the panel is prefetched ahead: a tile load waits for
    /// all of its 16 lines, and without prefetch a decode step ran at about half the memory bandwidth.
    /// Prefetching changes no result.
    #[inline(always)]
    pub unsafe fn block(x: *const u16, kp: usize, panel: *const u16, c: *mut f32, stream: bool) {
        let xs = KB * 2; // bytes per x row within a packed tile
        let ws = NR * 2 * 2; // bytes per pair-row of the panel
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        for ks in (0..kp).step_by(KB) {
            let a = x.add(ks * MB);
            let b = panel.add((ks / 2) * NR * 2);
            if stream {
                prefetch_step(b);
            }
            asm!(
                "tileloadd tmm2, [{a} + {xs}]",
                "tileloadd tmm3, [{b} + {ws}]",
                "tileloadd tmm4, [{b1} + {ws}]",
                "tdpbf16ps tmm0, tmm2, tmm3",
                "tdpbf16ps tmm1, tmm2, tmm4",
                a = in(reg) a,
                b = in(reg) b,
                b1 = in(reg) b.add(32),
                xs = in(reg) xs,
                ws = in(reg) ws,
                options(nostack, readonly),
            );
        }
        let cs = NR * 4;
        asm!(
            "tilestored [{c} + {cs}], tmm0",
            "tilestored [{c1} + {cs}], tmm1",
            c = in(reg) c,
            c1 = in(reg) c.add(16),
            cs = in(reg) cs,
            options(nostack),
        );
        let _ = MB;
    }

    /// [`block`] for 32 rows (two row blocks, `x` and `x + 16 rows`) into `c` `[32][32]` f32: four
    /// accumulators, so each K step's four tile loads feed four products (two loads per product in `block`).
    /// Each accumulator sees the same instruction sequence as in `block` (zeroed, then one `tdpbf16ps` per K
    /// step in order), so every element has the same bits either way.
    #[inline(always)]
    pub unsafe fn block2(x: *const u16, kp: usize, panel: *const u16, c: *mut f32, stream: bool) {
        let xs = KB * 2;
        let ws = NR * 2 * 2;
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for ks in (0..kp).step_by(KB) {
            let a = x.add(ks * MB);
            let b = panel.add((ks / 2) * NR * 2);
            if stream {
                prefetch_step(b);
            }
            asm!(
                "tileloadd tmm4, [{a} + {xs}]",
                "tileloadd tmm5, [{a1} + {xs}]",
                "tileloadd tmm6, [{b} + {ws}]",
                "tileloadd tmm7, [{b1} + {ws}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) a,
                a1 = in(reg) a.add(MB * kp),
                b = in(reg) b,
                b1 = in(reg) b.add(32),
                xs = in(reg) xs,
                ws = in(reg) ws,
                options(nostack, readonly),
            );
        }
        let cs = NR * 4;
        asm!(
            "tilestored [{c} + {cs}], tmm0",
            "tilestored [{c1} + {cs}], tmm1",
            "tilestored [{c2} + {cs}], tmm2",
            "tilestored [{c3} + {cs}], tmm3",
            c = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(MB * NR),
            c3 = in(reg) c.add(MB * NR + 16),
            cs = in(reg) cs,
            options(nostack),
        );
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub fn request() -> bool {
        false
    }
    pub unsafe fn configure() {}
    pub unsafe fn release() {}
    pub unsafe fn block(_: *const u16, _: usize, _: *const u16, _: *mut f32, _: bool) {
        unreachable!("AMX is never available here")
    }
    pub unsafe fn block2(_: *const u16, _: usize, _: *const u16, _: *mut f32, _: bool) {
        unreachable!("AMX is never available here")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_bf16_product() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this CPU");
            return;
        }
        let mut s = 5u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        };
        // Row counts that end on a single row block (17, 33, 50) and on a pair (64), and a weight of more
        // panels than one L2 group per task (n = 1200 at k = 896: 38 panels).
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 40, 33),
            (17, 70, 100),
            (33, 64, 896),
            (64, 1200, 896),
            (50, 45, 70),
        ] {
            let w: Vec<bf16> = (0..n * k).map(|_| rnd()).collect();
            let x: Vec<bf16> = (0..m * k).map(|_| rnd()).collect();
            let got = AmxWeight::pack(&w, n, k).matmul(&x, m, None);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|kk| {
                            f64::from(x[i * k + kk].to_f32()) * f64::from(w[j * k + kk].to_f32())
                        })
                        .sum();
                    let d = (f64::from(got[i * n + j]) - want).abs();
                    assert!(
                        d < 1e-4 * (k as f64).sqrt(),
                        "({m},{n},{k}) [{i},{j}] off by {d}"
                    );
                }
            }
            // A row gives the same bits alone as in the batch: the last row, and the first (computed in a
            // pair of row blocks when there are more than 16 rows).
            let packed = AmxWeight::pack(&w, n, k);
            let one = packed.matmul(&x[(m - 1) * k..], 1, None);
            assert_eq!(one, got[(m - 1) * n..].to_vec());
            assert_eq!(packed.matmul(&x[..k], 1, None), got[..n].to_vec());
        }
    }
}
