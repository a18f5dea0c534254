// Element types of the cpu backend: float32, float16 and bfloat16 storage, float32 arithmetic.
//
// Conversions are done with integer bit manipulation (no torch headers, no F16C requirement) and written
// branch-free (selects), so that the compiler vectorises the block loads and stores of kernels.cpp.
#pragma once

#include <cstdint>
#include <cstring>

namespace fas {

// Dtype codes passed from Python (fastadvseg/backends/cpu.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

static inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

static inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline float half_to_float(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa in float position
  // Scaling by 2^112 rebiases the exponent (15 -> 127); it also turns half subnormals into float normals.
  uint32_t mag = bits_of(float_of(em) * 0x1p112f);
  mag = em >= (0x7c00u << 13) ? (em | 0x7f800000u) : mag;  // inf and NaN keep an all-ones exponent
  return float_of(mag | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

static inline uint16_t float_to_half(float f) {  // round to nearest even
  const uint32_t x = bits_of(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  // normal halves: rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest even
  const uint32_t normal = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;
  // subnormal halves (|f| < 2^-14): adding 0.5f makes the FPU round at the half subnormal spacing 2^-24
  const uint32_t subnormal = bits_of(float_of(ax) + 0.5f) - 0x3f000000u;
  uint32_t r = ax < 0x38800000u ? subnormal : normal;
  r = ax >= 0x477ff000u ? 0x7c00u : r;  // |f| >= 65520 rounds to infinity
  r = ax > 0x7f800000u ? 0x7e00u : r;   // NaN stays (a quiet) NaN
  return static_cast<uint16_t>(r | sign);
}

static inline float bf16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

static inline uint16_t float_to_bf16(float f) {  // round to nearest even
  const uint32_t x = bits_of(f);
  uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  r = (x & 0x7fffffffu) > 0x7f800000u ? ((x >> 16) | 0x40u) : r;  // NaN stays (a quiet) NaN
  return static_cast<uint16_t>(r);
}

// Storage tags: S is the element type in memory; load/store convert to and from float32.
struct Float32 {
  using S = float;
  static inline float load(S v) { return v; }
  static inline S store(float f) { return f; }
};
struct Float16 {
  using S = uint16_t;
  static inline float load(S v) { return half_to_float(v); }
  static inline S store(float f) { return float_to_half(f); }
};
struct BFloat16 {
  using S = uint16_t;
  static inline float load(S v) { return bf16_to_float(v); }
  static inline S store(float f) { return float_to_bf16(f); }
};

}  // namespace fas

// Calls BODY with `Tag` naming the storage tag of dtype code CODE.
#define FAS_DISPATCH_DTYPE(CODE, ...)                      \
  switch (CODE) {                                          \
    case ::fas::kFloat32: {                                \
      using Tag = ::fas::Float32;                          \
      __VA_ARGS__;                                         \
    } break;                                               \
    case ::fas::kFloat16: {                                \
      using Tag = ::fas::Float16;                          \
      __VA_ARGS__;                                         \
    } break;                                               \
    case ::fas::kBFloat16: {                               \
      using Tag = ::fas::BFloat16;                         \
      __VA_ARGS__;                                         \
    } break;                                               \
    default:                                               \
      throw std::invalid_argument("unsupported dtype code"); \
  }
