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

__device__ __forceinline__ double denominator(double count) { return count > 0.0 ? count : 1.0; }

__device__ __forceinline__ void put(const Outputs& out, int i, double v) {
  if (out.p[i] != nullptr) *out.p[i] = static_cast<float>(v);
}

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
  if (threadIdx.x != 0) return;
  const Outputs& out = epi.out;
  switch (epi.kind) {
    case kEpiMean:
    case kEpiSemi: {
      const double den = epi.reduction == kReduceMean ? denominator(sums[1]) : 1.0;
      put(out, 0, sums[0] / den);
      put(out, 1, den);
      if (epi.kind == kEpiSemi) put(out, 2, sums[1] / (sums[2] > 1.0 ? sums[2] : 1.0));
      break;
    }
    case kEpiDiscriminator: {
      const double den_fake = denominator(sums[1]);
      const double den_real = denominator(sums[3]);
      put(out, 0, sums[0] / den_fake + sums[2] / den_real);
      put(out, 1, den_fake);
      put(out, 2, den_real);
      break;
    }
    case kEpiGenerator: {
      const double den_ce = denominator(sums[1]);
      const double den_adv = denominator(sums[3]);
      const double den_semi = denominator(sums[5]);
      // each field is rounded to float32 first, so total is exactly what the returned fields give
      const double ce = epi.labelled ? static_cast<float>(sums[0] / den_ce) : 0.0;
      const double adv = static_cast<float>(sums[2] / den_adv);
      const double semi = epi.labelled ? 0.0 : static_cast<float>(sums[4] / den_semi);
      const double total = epi.labelled ? ce + epi.lambda_adv * adv
                                        : epi.lambda_adv * adv +
                                              epi.lambda_semi * semi;
      const double ratio = epi.labelled ? 0.0 : sums[5] / (epi.pixels > 1.0 ? epi.pixels : 1.0);
      put(out, 0, total);
      put(out, 1, ce);
      put(out, 2, adv);
      put(out, 3, semi);
      put(out, 4, ratio);
      put(out, 5, den_ce);
      put(out, 6, den_adv);
      put(out, 7, den_semi);
      break;
    }
    default:
      break;
  }
}

}  // namespace

cudaError_t launch_finalize(const float* partials, int64_t G, int K, const Epilogue& epi, cudaStream_t stream) {
  if (K < 1 || K > kMaxK) return cudaErrorInvalidValue;
  finalize_kernel<<<1, kThreads, 0, stream>>>(partials, G, K, epi);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastadvseg
