// The AVX-512 build of the kernels (AVX-512 F/VL/DQ/BW + FMA; 16-lane pixel vectors), used at runtime only on
// CPUs that have all of them (kernels.cpp checks). As in kernels_avx2.cpp, the standard library is included
// before the target pragma.
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
#define FAS_HAVE_AVX512_BUILD 1
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define FAS_ISA avx512
#define FAS_TARGET_AVX512 1
// GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized (its _mm512_undefined_* helpers)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels_impl.h"
#endif
