//! Opening the compute device named by `--device` (`cpu`, `cuda`, `cuda:N`): one parser for the CLI, the
//! benchmarks and the tests.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// Opens `cpu` or `cuda:N` (`cuda` is `cuda:0`).
///
/// On CUDA, cudarc's per-allocation event tracking is turned off. candle runs every kernel of a thread on
/// that thread's default stream (`per_thread_stream`), so cudarc never enters its multi-stream mode and the
/// two events it creates (and later destroys) for every allocation are never recorded: pure driver calls,
/// about 1 700 of each per decode step of a 28-layer decoder. Work handed from one thread to another is
/// synchronised explicitly instead (the engine's encoder thread synchronises before handing over its
/// embeddings).
pub fn open(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let n = spec
        .strip_prefix("cuda:")
        .or((spec == "cuda").then_some("0"))
        .ok_or_else(|| {
            ModelError::Input(format!("the device must be cpu or cuda:N, got {spec:?}"))
        })?;
    let n: usize = n
        .parse()
        .map_err(|_| ModelError::Input(format!("bad CUDA ordinal in {spec:?}")))?;
    let dev = Device::new_cuda(n).map_err(|e| {
        ModelError::Input(format!(
            "cannot open {spec} (this build needs the cuda feature and a GPU): {e}"
        ))
    })?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        // SAFETY: see the doc comment: one stream per thread, no cross-stream sharing without an explicit
        // synchronisation, so cudarc's events have nothing to order.
        unsafe { d.disable_event_tracking() };
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(open("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda:"] {
            let e = open(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
