//! The GPU implementation of [`Collective`]: NCCL through cudarc's maintained bindings.
//!
//! Bootstrap: NCCL needs the same 128-byte unique id on every rank. Rank 0 makes it and sends it over the
//! group's TCP link ([`TcpGroup`], which also carries rank 0's step instructions), so no second rendezvous
//! service is needed. Then every rank opens its communicator on its GPU.
//!
//! Two builds share this file:
//! * feature `nccl` (cudarc loads libcuda/libnccl at run time): the byte-slice methods copy host buffers to
//!   the device and back. It compiles and runs its id exchange on machines without a GPU (CI).
//! * feature `cuda` (cudarc linked as candle links it): additionally, [`Collective::all_reduce_tensor`] of a
//!   candle CUDA tensor runs NCCL on candle's own buffers and stream, so the decoder's row-parallel sums never
//!   leave the GPU. Form the group with [`NcclGroup::with_stream`] on the model's device stream
//!   (`CudaDevice::cuda_stream`), so that NCCL is ordered with the kernels that produce its input.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::tcp::TcpGroup;
use crate::{Collective, CollectiveError, Result};

fn gpu(e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Setup(format!("NCCL/CUDA: {e:?}"))
}

/// True when libnccl can be loaded (it can without a GPU; a communicator then needs one).
#[cfg(feature = "nccl")]
pub fn nccl_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// The CUDA build links libnccl, so it is present whenever the program started.
#[cfg(feature = "cuda")]
pub fn nccl_present() -> bool {
    true
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
        let ctx = CudaContext::new(ordinal).map_err(gpu)?;
        Self::with_stream(bootstrap, ctx.default_stream())
    }

    /// Forms the group with NCCL running on `stream` (in the CUDA build: the model device's stream).
    pub fn with_stream(bootstrap: Arc<TcpGroup>, stream: Arc<CudaStream>) -> Result<Self> {
        if !nccl_present() {
            return Err(CollectiveError::Setup(
                "libnccl is not loadable (install NCCL or set LD_LIBRARY_PATH)".into(),
            ));
        }
        let id = exchange_id(bootstrap.as_ref())?;
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
        let sizes = self
            .bootstrap
            .all_gather(&crate::len_as_f32s(buf.len()))?
            .iter()
            .map(|v| crate::len_from_f32s(v))
            .collect::<Result<Vec<usize>>>()?;
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

    /// CUDA tensors are summed by NCCL on the device, in f32 as the TCP group sums (and also for one rank,
    /// so that a one-GPU run exercises the same path as a group).
    #[cfg(feature = "cuda")]
    fn all_reduce_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        use candle_core::DType;
        if !t.device().is_cuda() {
            let mut v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            self.all_reduce_sum(&mut v)?;
            return Ok(
                candle_core::Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?
            );
        }
        let sum = t
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&device::AllReduce(self))?;
        Ok(sum.to_dtype(t.dtype())?)
    }
}

/// NCCL on candle's device buffers, as a candle custom op (the public way to reach a tensor's storage).
#[cfg(feature = "cuda")]
mod device {
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape};

    use super::NcclGroup;

    pub(super) struct AllReduce<'a>(pub(super) &'a NcclGroup);

    fn err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}"))
    }

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            Err(err("a CPU tensor reached the device path"))
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| err("the input is not contiguous"))?;
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let mut dst = self.0.stream.alloc_zeros::<f32>(end - start).map_err(err)?;
            let comm = self.0.comm.lock().unwrap_or_else(|p| p.into_inner());
            comm.all_reduce(&src, &mut dst, &cudarc::nccl::safe::ReduceOp::Sum)
                .map_err(err)?;
            Ok((
                CudaStorage::wrap_cuda_slice(dst, s.device().clone()),
                l.shape().clone(),
            ))
        }
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

    /// One rank on the GPU: NCCL sums candle's device buffer on candle's stream (an identity for one rank,
    /// which still runs the whole device path: storage access, NCCL, wrapping the result). Needs a GPU; it
    /// skips without one unless `AFNEXT_EXPECT_GPU` is set (scripts/gpu-check.sh sets it).
    #[cfg(feature = "cuda")]
    #[test]
    fn one_rank_sums_device_tensors_on_the_gpu() {
        use candle_core::{DType, Device, Tensor};
        let dev = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                assert!(
                    std::env::var("AFNEXT_EXPECT_GPU").is_err(),
                    "no GPU but AFNEXT_EXPECT_GPU is set: {e}"
                );
                eprintln!("skipped: no GPU ({e})");
                return;
            }
        };
        let Device::Cuda(cuda) = &dev else {
            unreachable!()
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = Arc::new(TcpGroup::lead(l, 1, TcpConfig::default()).unwrap());
        let g = NcclGroup::with_stream(tcp, cuda.cuda_stream()).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let t = Tensor::randn(0f32, 1.0, (3, 1000), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let s = g.all_reduce_tensor(&t).unwrap();
            assert!(s.device().is_cuda());
            assert_eq!(s.dtype(), dtype);
            let host = |x: &Tensor| -> Vec<f32> {
                x.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(host(&s), host(&t));
        }
        // The host path of the same group.
        let mut v = vec![1.5f32, -2.0, 3.25];
        g.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0, 3.25]);
    }
}
