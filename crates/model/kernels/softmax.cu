// Row softmax of scale x scores for attention: f32 arithmetic, one rounding to the storage dtype, and an optional
// causal limit per row, so that attention needs neither an f32 copy of its scores nor an additive mask.
// Semantics are those of `afnext_model::softmax::softmax_rows` (whose CPU implementation the tests compare
// with plain softmax): row r of `nrows` rows of `ncols` values keeps columns c < visible(r), where
// visible(r) = ncols if diag == 0, else min(ncols, first + r % diag + 1); later columns are written as 0.
#include "common.cuh"
#include <math_constants.h>

// Columns row `row` keeps: all, or its causal prefix first + row % diag + 1 (see the file comment).
__device__ __forceinline__ int visible(long long row, int ncols, int diag, int first) {
  if (diag <= 0) return ncols;
  const long long v = (long long)first + row % diag + 1;
  return v < ncols ? (int)v : ncols;
}

// exp for a result rounded to T: accurate for f32; the fast hardware exp (relative error ~2^-21, far below
// a 16-bit type's rounding) for bf16/f16, where the accurate one made the kernel compute-bound.
template <typename T> __device__ __forceinline__ float ex(float x) { return __expf(x); }
template <> __device__ __forceinline__ float ex<float>(float x) { return expf(x); }
// v / s, or v times 1/s where the result is rounded to 16 bits anyway.
template <typename T> __device__ __forceinline__ float norm(float v, float inv, float s) { return v * inv; }
template <> __device__ __forceinline__ float norm<float>(float v, float inv, float s) { return v / s; }

// Merges two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  float mm = fmaxf(m, m2);
  if (mm == -CUDART_INF_F) return;  // both empty
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

// Rows of at most 32 * CPL columns: one warp per row, the row held in registers (read once, written once).
template <typename T, int CPL>
__device__ void softmax_rows_warp(const T *x, T *y, long long nrows, int ncols, int diag, int first, float scale) {
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= nrows) return;  // the whole warp leaves together
  const T *xr = x + row * ncols;
  T *yr = y + row * ncols;
  const int vis = visible(row, ncols, diag, first);
  float v[CPL];
  float m = -CUDART_INF_F;
#pragma unroll
  for (int i = 0; i < CPL; i++) {
    const int c = lane + i * 32;
    v[i] = c < vis ? to_f(xr[c]) * scale : -CUDART_INF_F;
    m = fmaxf(m, v[i]);
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < CPL; i++) {
    const int c = lane + i * 32;
    v[i] = c < vis ? ex<T>(v[i] - m) : 0.f;
    s += v[i];
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
  const float inv = 1.f / s;
#pragma unroll
  for (int i = 0; i < CPL; i++) {
    const int c = lane + i * 32;
    if (c < ncols) yr[c] = from_f<T>(c < vis ? norm<T>(v[i], inv, s) : 0.f);
  }
}

// Longer rows: one block per row; blockDim.x is a multiple of 32 and at most 1024.
template <typename T>
__device__ void softmax_rows(const T *x, T *y, int ncols, int diag, int first, float scale) {
  const long long row = blockIdx.x;
  const T *xr = x + row * ncols;
  T *yr = y + row * ncols;
  const int vis = visible(row, ncols, diag, first);
  // Pass 1: an online (max, sum) per thread, then per warp, then per block.
  float m = -CUDART_INF_F, s = 0.f;
  for (int c = threadIdx.x; c < vis; c += blockDim.x) {
    float v = to_f(xr[c]) * scale;
    if (v > m) {
      s = s * ex<T>(m - v) + 1.f;
      m = v;
    } else if (v != -CUDART_INF_F) {
      s += ex<T>(v - m);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffff, m, off);
    float s2 = __shfl_xor_sync(0xffffffff, s, off);
    merge(m, s, m2, s2);
  }
  __shared__ float sm[32], ss[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  m = lane < warps ? sm[lane] : -CUDART_INF_F;
  s = lane < warps ? ss[lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffff, m, off);
    float s2 = __shfl_xor_sync(0xffffffff, s, off);
    merge(m, s, m2, s2);
  }
  // Pass 2: every lane of every warp now holds the row's (max, sum).
  const float inv = 1.f / s;
  for (int c = threadIdx.x; c < ncols; c += blockDim.x) {
    yr[c] = from_f<T>(c < vis ? norm<T>(ex<T>(to_f(xr[c]) * scale - m), inv, s) : 0.f);
  }
}

extern "C" __global__ void afnext_softmax_rows_f32(const float *x, float *y, int ncols, int diag, int first, float scale) {
  softmax_rows(x, y, ncols, diag, first, scale);
}
extern "C" __global__ void afnext_softmax_rows_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, int ncols, int diag,
                                                    int first, float scale) {
  softmax_rows(x, y, ncols, diag, first, scale);
}
extern "C" __global__ void afnext_softmax_rows_f16(const __half *x, __half *y, int ncols, int diag, int first, float scale) {
  softmax_rows(x, y, ncols, diag, first, scale);
}

// Rows of at most 2 048 columns (WARP_COLS in softmax.rs): 32 x 64 per warp.
extern "C" __global__ void afnext_softmax_rows_warp_f32(const float *x, float *y, long long nrows, int ncols,
                                                        int diag, int first, float scale) {
  softmax_rows_warp<float, 64>(x, y, nrows, ncols, diag, first, scale);
}
extern "C" __global__ void afnext_softmax_rows_warp_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, long long nrows,
                                                         int ncols, int diag, int first, float scale) {
  softmax_rows_warp<__nv_bfloat16, 64>(x, y, nrows, ncols, diag, first, scale);
}
extern "C" __global__ void afnext_softmax_rows_warp_f16(const __half *x, __half *y, long long nrows, int ncols,
                                                        int diag, int first, float scale) {
  softmax_rows_warp<__half, 64>(x, y, nrows, ncols, diag, first, scale);
}
