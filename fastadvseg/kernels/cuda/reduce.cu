// Finalize: the second, tiny launch of every loss op. One block of kThreads threads reduces each of the K rows of
// per-block partial sums (K x G float32, G <= 2048) in a fixed order in float64 and writes the K column sums as
// float32 (no epilogue: the caller forms means). A labelled op has one more row, the per-block bad-label counts,
// and G int64 per-block smallest bad pixel indices: their sum and min give bad = [count, label value at the
// smallest index] (the value read through the label map's strides; 0 when there is none).
// Bytes moved: reads (K+1)*G*4 + G*8 bytes (<= 80 KiB), writes K floats and 2 int64. Deterministic: no atomics.
#include "common.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

constexpr int kMaxRows = 8;

__global__ void __launch_bounds__(kThreads) finalize_kernel(Workspace ws, Finalize f) {
  __shared__ double red[kThreads];
  __shared__ double col[kMaxRows];
  __shared__ long long first[kThreads];
  const int rows = f.K + (f.bad != nullptr ? 1 : 0);
  for (int k = 0; k < rows; ++k) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < ws.G; i += kThreads) s += static_cast<double>(ws.partials[k * ws.G + i]);
    red[threadIdx.x] = s;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
      if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
      __syncthreads();
    }
    if (threadIdx.x == 0) col[k] = red[0];
    __syncthreads();
  }
  long long m = kNoBad;
  if (f.bad != nullptr) {
    for (int64_t i = threadIdx.x; i < ws.G; i += kThreads) {
      const long long v = ws.first_bad[i];
      m = v < m ? v : m;
    }
  }
  first[threadIdx.x] = m;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o && first[threadIdx.x + o] < first[threadIdx.x]) first[threadIdx.x] = first[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) write_results(col, static_cast<int64_t>(first[0]), f);
}

}  // namespace

cudaError_t launch_finalize(const Workspace& ws, const Finalize& f, cudaStream_t stream) {
  if (f.K < 1 || f.K + (f.bad != nullptr ? 1 : 0) > kMaxRows) return cudaErrorInvalidValue;
  finalize_kernel<<<1, kThreads, 0, stream>>>(ws, f);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastadvseg
