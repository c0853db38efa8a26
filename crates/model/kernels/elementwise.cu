// Element-wise kernels that save a pass over memory (or candle's strided broadcast path) on the GPU.
// Semantics are those of `afnext_model::elementwise` (whose CPU implementations the tests compare with
// candle's compositions): each result is what the unfused operations give, rounding where they round.
#include "common.cuh"

// y[r][c] = x[r][c] + b[c]: a linear layer's bias over `rows` rows of `cols` (candle's broadcast add walks
// the strides of every element). Grid: x over columns (blockDim.x each), y over rows (strided).
// With GELU: gelu_erf of the rounded sum, rounded (a linear layer's output, then its activation).
template <typename T, bool GELU>
__device__ void add_bias(const T *x, const T *b, T *y, long long rows, int cols) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const float bc = to_f(b[c]);
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    const long long i = r * cols + c;
    float v = to_f(x[i]) + bc;
    if (GELU) {
      v = to_f(from_f<T>(v));
      v = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    }
    y[i] = from_f<T>(v);
  }
}

// y = silu(g) * u, with silu's result rounded to T before the product, as the two unfused operations do.
template <typename T>
__device__ void silu_mul(const T *g, const T *u, T *y, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float a = to_f(g[i]);
    const float s = to_f(from_f<T>(a / (1.f + expf(-a))));
    y[i] = from_f<T>(s * to_f(u[i]));
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                            \
  extern "C" __global__ void afnext_add_bias_##SUFFIX(const T *x, const T *b, T *y, long long rows, int cols) { \
    add_bias<T, false>(x, b, y, rows, cols);                                                               \
  }                                                                                                        \
  extern "C" __global__ void afnext_add_bias_gelu_##SUFFIX(const T *x, const T *b, T *y, long long rows,    \
                                                           int cols) {                                     \
    add_bias<T, true>(x, b, y, rows, cols);                                                                \
  }                                                                                                        \
  extern "C" __global__ void afnext_silu_mul_##SUFFIX(const T *g, const T *u, T *y, long long n) {         \
    silu_mul(g, u, y, n);                                                                                  \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
