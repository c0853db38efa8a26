//! Embeddings on the wire between tiers: `[rows, hidden]` in the model's dtype, raw little-endian bytes.

use candle_core::{DType, Device, Tensor};

use crate::cluster_pb::{EmbeddingDtype, PushWindowRequest};
use crate::status::ApiError;

fn bad(problem: String) -> ApiError {
    ApiError::BadRequest {
        location: "window embeddings".into(),
        problem,
    }
}

/// A push of `rows` (`[n, hidden]`, f32/bf16/f16) for window `window` of audio `audio` of `request_id`.
pub fn push_request(
    request_id: u64,
    audio: u32,
    window: u32,
    rows: &Tensor,
) -> Result<PushWindowRequest, candle_core::Error> {
    let (n, hidden) = rows.dims2()?;
    let (dtype, rows) = match rows.dtype() {
        DType::BF16 => (EmbeddingDtype::Bf16, rows.clone()),
        DType::F16 => (EmbeddingDtype::F16, rows.clone()),
        _ => (EmbeddingDtype::F32, rows.to_dtype(DType::F32)?),
    };
    let data = match dtype {
        EmbeddingDtype::Bf16 => rows
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        EmbeddingDtype::F16 => rows
            .flatten_all()?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => rows
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    };
    Ok(PushWindowRequest {
        request_id,
        audio,
        window,
        rows: n as u32,
        hidden: hidden as u32,
        dtype: dtype as i32,
        data,
    })
}

/// The tensor of a push, checked against its declared shape.
pub fn rows_of(p: &PushWindowRequest) -> Result<Tensor, ApiError> {
    let dtype = match EmbeddingDtype::try_from(p.dtype) {
        Ok(EmbeddingDtype::F32) => DType::F32,
        Ok(EmbeddingDtype::Bf16) => DType::BF16,
        Ok(EmbeddingDtype::F16) => DType::F16,
        _ => return Err(bad(format!("unknown dtype {}", p.dtype))),
    };
    let (n, h) = (p.rows as usize, p.hidden as usize);
    let want = n * h * dtype.size_in_bytes();
    if p.data.len() != want {
        return Err(bad(format!(
            "{} bytes for [{n}, {h}] {dtype:?} (expected {want})",
            p.data.len()
        )));
    }
    Tensor::from_raw_buffer(&p.data, dtype, &[n, h], &Device::Cpu).map_err(|e| bad(e.to_string()))
}
