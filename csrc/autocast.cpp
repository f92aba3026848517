// Autocast of msfused::block_forward in C++: inside torch.autocast(device, dtype) the
// forward runs in the dtype the current context names, as conv2d does. x and the weights
// are cast by at::autocast::cached_cast (floating tensors on that device, float64 excluded;
// weight casts cached for the context like conv2d's), then the op runs with that device's
// autocast key excluded. The kernels accumulate in float32 whatever the input dtype; the
// CPU's native bfloat16 path rounds a and b to bfloat16 as the pointwise GEMM's operands
// (as eager does), every other intermediate stays float32 (csrc/cpu/kernel_bf16_forward.h).
//
// block_backward needs no Autocast kernel (autocast's fallthrough applies): autograd calls
// it with what the forward saved, already in the autocast dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "op_signature.h"

namespace msfused {
namespace {

template <c10::DeviceType Dev, c10::DispatchKey Key>
std::tuple<at::Tensor, at::Tensor> block_forward_autocast(MSF_FORWARD_PARAMS) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
  const at::ScalarType dt = at::autocast::get_autocast_dtype(Dev);
  auto c = [dt](const auto& t) { return at::autocast::cached_cast(dt, t, Dev); };
  return block_forward_op().call(c(x), c(wa), c(ba), c(wb), c(bb), c(wc), c(bc), c(pa), c(qa),
                                 c(pb), c(qb), c(ws), c(bs), MSF_CONFIG_ARGS, save_preact);
}

}  // namespace
}  // namespace msfused

TORCH_LIBRARY_IMPL(msfused, AutocastCPU, m) {
  m.impl("block_forward",
         &msfused::block_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(msfused, AutocastCUDA, m) {
  m.impl("block_forward",
         &msfused::block_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}
