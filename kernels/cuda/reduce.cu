// Finalize: the second, tiny launch of every loss op. One block of kThreads threads reduces the K rows of
// per-block partial sums (K x G float32, G <= 2048) in a fixed order in float64, then applies the op's epilogue:
//   mean = sum / (count > 0 ? count : 1)   (an empty mean is 0 and its gradient scale finite),
//   semi ratio = kept / max(considered, 1), generator total = ce + l_adv*adv | l_adv*adv + l_semi*semi.
// Bytes moved: reads K*G*4 bytes (<= 48 KiB), writes <= 8 floats. Deterministic: no atomics.
#include "common.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

constexpr int kMaxK = 8;

__global__ void __launch_bounds__(kThreads) finalize_kernel(const float* __restrict__ partials, int64_t G, int K,
                                                            Epilogue epi) {
  __shared__ double red[kThreads];
  __shared__ double sums[kMaxK];
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < G; i += kThreads) s += static_cast<double>(partials[k * G + i]);
    red[threadIdx.x] = s;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
      if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
      __syncthreads();
    }
    if (threadIdx.x == 0) sums[k] = red[0];
    __syncthreads();
  }
  if (threadIdx.x == 0) apply_epilogue(sums, epi);
}

}  // namespace

cudaError_t launch_finalize(const float* partials, int64_t G, int K, const Epilogue& epi, cudaStream_t stream) {
  if (K < 1 || K > kMaxK) return cudaErrorInvalidValue;
  finalize_kernel<<<1, kThreads, 0, stream>>>(partials, G, K, epi);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastadvseg
