// The bfloat16 kernels compiled for AVX-512 with AVX512-BF16: the native bfloat16 forward
// (kernel_bf16_forward.h) and the float32 kernels on bfloat16 storage (block_kernel_impl.h's
// block_forward_bf16_f32 and block_backward_bf16, nothing else of it: MSFUSED_BF16_ONLY).
// Their roundings to bfloat16 (rows of A, y, the saved pre-activation, dx, the backward's
// GEMM operands) are one vcvtneps2bf16 or vcvtne2ps2bf16 each (kernel_simd.h,
// MSFUSED_HW_BF16). The binding runs them only on CPUs with AVX512-BF16; a translation unit
// of its own because the AVX-512 build's kernels also run on AVX-512 CPUs without it.
// Off x86-64 this is a baseline build that nothing calls.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define MSFUSED_VEC_BYTES 64
#define MSFUSED_HW_BF16
#endif
#define MSFUSED_ISA avx512bf16
#define MSFUSED_BF16_ONLY
#include <type_traits>

#include "cpu/block_kernel.h"
#include "cpu/block_kernel_impl.h"
#include "cpu/kernel_bf16_forward.h"

namespace msfused {
namespace cpu {
namespace avx512bf16 {

void block_forward_bf16(const Runtime& rt, const BlockDesc& d, const BlockTensors<uint16_t>& t,
                        uint16_t* y, uint16_t* pre) {
  dispatch_act(d.act, [&](auto act) {
    constexpr int ACT = decltype(act)::value;
    if (d.stride == 1)
      forward_pm_bf16<1, ACT>(rt, d, t, y, pre);
    else
      forward_pm_bf16<2, ACT>(rt, d, t, y, pre);
  });
}

}  // namespace avx512bf16
}  // namespace cpu
}  // namespace msfused
