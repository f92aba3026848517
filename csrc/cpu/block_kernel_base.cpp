// The CPU kernels compiled for the baseline instruction set of the build (SSE2 on x86-64,
// NEON on arm64): the fallback when the CPU lacks AVX2/FMA, and on other architectures.
#define MSFUSED_ISA base
#include "cpu/block_kernel_impl.h"
