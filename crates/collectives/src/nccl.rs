//! The GPU implementation of [`Collective`]: NCCL through cudarc's maintained bindings.
//!
//! Bootstrap: NCCL needs the same 128-byte unique id on every rank. Rank 0 makes it and sends it over the
//! group's TCP link ([`TcpGroup`], which also carries rank 0's step instructions), so no second rendezvous
//! service is needed. Then every rank opens its communicator on its GPU.
//!
//! This build exchanges host buffers (copy to the device, NCCL, copy back): it is the correct, portable
//! baseline that compiles and runs its id exchange on machines without a GPU. The CUDA build of the model
//! overrides the tensor methods to reduce candle's device buffers in place.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::tcp::TcpGroup;
use crate::{Collective, CollectiveError, Result};

fn gpu(e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Setup(format!("NCCL/CUDA: {e:?}"))
}

/// True when libnccl can be loaded (it can without a GPU; a communicator then needs one).
pub fn nccl_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Rank 0 makes a unique id and broadcasts it over `bootstrap`; every rank returns the same id.
pub fn exchange_id(bootstrap: &dyn Collective) -> Result<Id> {
    let mine = if bootstrap.rank() == 0 {
        let id = Id::new().map_err(gpu)?;
        id.internal().iter().map(|&c| c as u8).collect()
    } else {
        Vec::new()
    };
    let bytes = bootstrap.broadcast(0, mine)?;
    let internal: [std::ffi::c_char; 128] = bytes
        .iter()
        .map(|&b| b as std::ffi::c_char)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| CollectiveError::Protocol(format!("NCCL id of {} bytes", bytes.len())))?;
    Ok(Id::uninit(internal))
}

/// One rank of an NCCL group on GPU `ordinal`.
#[derive(Debug)]
pub struct NcclGroup {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    bootstrap: Arc<TcpGroup>,
}

// SAFETY: the communicator is only used under the mutex, one operation at a time, as NCCL requires.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// Forms the NCCL group of the ranks of `bootstrap`, this rank on GPU `ordinal`.
    pub fn new(bootstrap: Arc<TcpGroup>, ordinal: usize) -> Result<Self> {
        if !nccl_present() {
            return Err(CollectiveError::Setup(
                "libnccl is not loadable (install NCCL or set LD_LIBRARY_PATH)".into(),
            ));
        }
        let id = exchange_id(bootstrap.as_ref())?;
        let ctx = CudaContext::new(ordinal).map_err(gpu)?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), bootstrap.rank(), bootstrap.world_size(), id)
            .map_err(gpu)?;
        Ok(NcclGroup {
            comm: Mutex::new(comm),
            stream,
            bootstrap,
        })
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.bootstrap.rank()
    }
    fn world_size(&self) -> usize {
        self.bootstrap.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let mut d = self.stream.clone_htod(buf).map_err(gpu)?;
        comm.all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(gpu)?;
        let out = self.stream.clone_dtoh(&d).map_err(gpu)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    /// NCCL gathers equal sizes: every buffer is padded to the largest (sizes go over the bootstrap link).
    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>> {
        let sizes: Vec<usize> = self
            .bootstrap
            .all_gather(&[buf.len() as f32])?
            .iter()
            .map(|v| v.first().copied().unwrap_or(0.0) as usize)
            .collect();
        let max = sizes.iter().copied().max().unwrap_or(0);
        let mut padded = buf.to_vec();
        padded.resize(max, 0.0);
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let src = self.stream.clone_htod(&padded).map_err(gpu)?;
        let mut dst = self
            .stream
            .alloc_zeros::<f32>(max * sizes.len())
            .map_err(gpu)?;
        comm.all_gather(&src, &mut dst).map_err(gpu)?;
        let all = self.stream.clone_dtoh(&dst).map_err(gpu)?;
        Ok(sizes
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * max..r * max + n].to_vec())
            .collect())
    }

    /// Control messages are small and go over the bootstrap link.
    fn broadcast(&self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        self.bootstrap.broadcast(root, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::TcpConfig;

    /// The id exchange needs libnccl but no GPU: every rank ends up with rank 0's id.
    #[test]
    fn every_rank_gets_rank_0s_nccl_id() {
        if !nccl_present() {
            assert!(
                std::env::var("AFNEXT_EXPECT_NCCL").is_err(),
                "libnccl is not loadable but AFNEXT_EXPECT_NCCL is set (.ci/run installs it)"
            );
            eprintln!("skipped: libnccl is not loadable (see .ci/run)");
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cfg = TcpConfig::default();
        let f = std::thread::spawn(move || {
            let g = TcpGroup::join(1, 2, &addr, cfg).unwrap();
            *exchange_id(&g).unwrap().internal()
        });
        let g = TcpGroup::lead(l, 2, cfg).unwrap();
        let id = *exchange_id(&g).unwrap().internal();
        assert_eq!(f.join().unwrap(), id);
        assert!(id.iter().any(|&c| c != 0));
    }
}
