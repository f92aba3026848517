// Autograd of the msfused:: operators in C++ (as torchvision's csrc/ops do): the forward
// saves x, the weights and only what the final activation's gradient reads (activations.h
// ActSaves: y, the pre-activation, or nothing), and the backward recomputes the branches
// from x in one block_backward call. Without a gradient to record (no_grad, or nothing
// requires grad) the kernels redispatch at once, with no autograd node.
#include <torch/autograd.h>
#include <torch/library.h>

#include "activations.h"
#include "op_signature.h"

namespace msfused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

std::optional<at::Tensor> or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

bool any_requires_grad(const at::Tensor& x, MSF_WEIGHT_PARAMS) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : {&x, &wa, &wb, &wc, &pa, &pb})
    if (t->requires_grad()) return true;
  for (const std::optional<at::Tensor>* t : {&ba, &bb, &bc, &qa, &qb, &ws, &bs})
    if (t->has_value() && (*t)->requires_grad()) return true;
  return false;
}

class BlockForward : public torch::autograd::Function<BlockForward> {
 public:
  static variable_list forward(AutogradContext* ctx, MSF_FORWARD_PARAMS) {
    at::AutoDispatchBelowADInplaceOrView below;
    const ActSaves kind = act_saves(static_cast<int>(act));
    // An activation whose gradient reads the pre-activation gets it from the same launch,
    // whether or not the caller asked for it as an output.
    auto [y, pre] = block_forward_op().call(x, MSF_WEIGHT_ARGS, MSF_CONFIG_ARGS,
                                            save_preact || kind == kSavesPreact);
    const at::Tensor saved =
        kind == kSavesOutput ? y : (kind == kSavesPreact ? pre : at::Tensor());
    ctx->save_for_backward({x, saved, wa, or_undefined(ba), wb, or_undefined(bb), wc,
                            or_undefined(bc), pa, or_undefined(qa), pb, or_undefined(qb),
                            or_undefined(ws), or_undefined(bs)});
    ctx->saved_data["config"] = std::vector<int64_t>{stride, merge, act, residual ? 1 : 0};
    if (!save_preact && kind == kSavesPreact) pre = at::empty({0}, x.options());
    ctx->mark_non_differentiable({pre});
    return {y, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto s = ctx->get_saved_variables();
    const auto cfg = ctx->saved_data["config"].toIntVector();
    const at::Tensor& x = s[0];
    variable_list out(1 + kNumWeights + 5);  // one per forward argument

    if (!grad_out[0].defined()) return out;
    const at::Tensor saved = s[1].defined() ? s[1] : at::empty({0}, x.options());
    std::vector<at::Tensor> g = block_backward_op().call(
        grad_out[0], x, saved, s[2], or_none(s[3]), s[4], or_none(s[5]), s[6], or_none(s[7]),
        s[8], or_none(s[9]), s[10], or_none(s[11]), or_none(s[12]), or_none(s[13]), cfg[0],
        cfg[1], cfg[2], cfg[3] != 0);
    out[0] = g[0];
    // a weight the block does not have (a bias with bias=False, no projection) gets none
    for (int i = 0; i < kNumWeights; ++i) out[1 + i] = s[2 + i].defined() ? g[1 + i] : at::Tensor();
    return out;
  }
};

// block_backward's own autograd: it has none (no double backward), and says so rather
// than returning a silently wrong second derivative.
class BlockBackward : public torch::autograd::Function<BlockBackward> {
 public:
  static variable_list forward(AutogradContext*, MSF_BACKWARD_PARAMS) {
    at::AutoDispatchBelowADInplaceOrView below;
    return block_backward_op().call(MSF_BACKWARD_ARGS);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "msfused::block_backward has no derivative: double backward through "
                "the fused block is not supported (use backend='reference')");
  }
};

std::tuple<at::Tensor, at::Tensor> block_forward_autograd(MSF_FORWARD_PARAMS) {
  if (!any_requires_grad(x, MSF_WEIGHT_ARGS)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return block_forward_op().call(MSF_FORWARD_ARGS);
  }
  variable_list r = BlockForward::apply(MSF_FORWARD_ARGS);
  return {r[0], r[1]};
}

std::vector<at::Tensor> block_backward_autograd(MSF_BACKWARD_PARAMS) {
  if (!any_requires_grad(grad_y, MSF_WEIGHT_ARGS) && !x.requires_grad() &&
      !saved.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView below;
    return block_backward_op().call(MSF_BACKWARD_ARGS);
  }
  return BlockBackward::apply(MSF_BACKWARD_ARGS);
}

}  // namespace
}  // namespace msfused

TORCH_LIBRARY_IMPL(msfused, Autograd, m) {
  m.impl("block_forward", &msfused::block_forward_autograd);
  m.impl("block_backward", &msfused::block_backward_autograd);
}

// The same kernels at the per-device keys too: msfused/ops/lowering.py reaches them from
// Python by key (OpOverload._op_dk), which finds a kernel registered at the key itself,
// not one that the Autograd alias fills in.
TORCH_LIBRARY_IMPL(msfused, AutogradCPU, m) {
  m.impl("block_forward", &msfused::block_forward_autograd);
}
TORCH_LIBRARY_IMPL(msfused, AutogradCUDA, m) {
  m.impl("block_forward", &msfused::block_forward_autograd);
}
