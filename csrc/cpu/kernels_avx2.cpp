// The AVX2 + FMA build of the kernels, used at runtime only on CPUs that have both (kernels.cpp checks).
// Everything this file includes from the standard library is included before the target pragma, so that no
// inline or template code shared with the portable build is compiled for AVX2.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>  // (its intrinsics carry their own target attributes)
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAS_HAVE_AVX2_BUILD 1
#pragma GCC target("avx2,fma")
#define FAS_ISA avx2
#define FAS_TARGET_AVX2 1
#include "kernels_impl.h"
#endif
