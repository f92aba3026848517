// The CPU kernels compiled for AVX2 + FMA; the binding runs them only when the CPU has
// both (elsewhere, and off x86-64, this is a second copy of the baseline build).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#endif
#define MSFUSED_ISA avx2
#include "cpu/block_kernel_impl.h"
