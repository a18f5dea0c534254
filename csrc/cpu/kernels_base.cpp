// The portable build of the kernels (whatever the compiler targets by default; SSE2 on x86-64).
#define FAS_ISA base
#include "kernels_impl.h"
