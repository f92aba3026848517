// The CPU kernels compiled for AVX2 + FMA + F16C; the binding runs them only when the CPU
// has all three (elsewhere, and off x86-64, this is a second copy of the baseline build).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")
// float16 storage converts with vcvtph2ps / vcvtps2ph (kernel_simd.h); GCC only, whose
// target pragma enables the intrinsics for the code after it
#if defined(__GNUC__) && !defined(__clang__)
#define MSFUSED_F16C
#endif
#endif
#define MSFUSED_ISA avx2
#include "cpu/block_kernel_impl.h"
