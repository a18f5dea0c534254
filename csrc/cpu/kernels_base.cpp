// The portable build of the kernels (whatever the compiler targets by default; SSE2 on x86-64).
#if defined(__x86_64__)
#include <immintrin.h>  // used only when the compiler targets FMA (FASTADVSEG_CPU_NATIVE=1)
#endif
#define FAS_ISA base
#include "kernels_impl.h"
