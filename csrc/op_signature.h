// The C++ signatures of the msfused:: operators (csrc/ops.cpp holds their schemas), as
// parameter-list macros so that every kernel (CPU, CUDA, Autograd, Autocast) is written
// against one definition, and typed handles for calling the operators through the
// dispatcher.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

// x and the weights in schema order; ws/bs (the projection) are None without one.
#define MSF_WEIGHT_PARAMS                                                                  \
  const at::Tensor &wa, const std::optional<at::Tensor>&ba, const at::Tensor &wb,          \
      const std::optional<at::Tensor>&bb, const at::Tensor &wc,                            \
      const std::optional<at::Tensor>&bc, const at::Tensor &pa,                            \
      const std::optional<at::Tensor>&qa, const at::Tensor &pb,                            \
      const std::optional<at::Tensor>&qb, const std::optional<at::Tensor>&ws,              \
      const std::optional<at::Tensor>&bs
#define MSF_WEIGHT_ARGS wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs
#define MSF_CONFIG_PARAMS int64_t stride, int64_t merge, int64_t act, bool residual
#define MSF_CONFIG_ARGS stride, merge, act, residual

// block_forward(x, <weights>, stride, merge, act, residual, save_preact) -> (y, preact)
#define MSF_FORWARD_PARAMS \
  const at::Tensor &x, MSF_WEIGHT_PARAMS, MSF_CONFIG_PARAMS, bool save_preact
#define MSF_FORWARD_ARGS x, MSF_WEIGHT_ARGS, MSF_CONFIG_ARGS, save_preact

// block_backward(grad_y, x, saved, <weights>, stride, merge, act, residual) ->
//   [dx, dwa, dba, dwb, dbb, dwc, dbc, dpa, dqa, dpb, dqb, dws, dbs]
#define MSF_BACKWARD_PARAMS                                                       \
  const at::Tensor &grad_y, const at::Tensor &x, const at::Tensor &saved, MSF_WEIGHT_PARAMS, \
      MSF_CONFIG_PARAMS
#define MSF_BACKWARD_ARGS grad_y, x, saved, MSF_WEIGHT_ARGS, MSF_CONFIG_ARGS

namespace msfused {

using BlockForwardSig = std::tuple<at::Tensor, at::Tensor>(MSF_FORWARD_PARAMS);
using BlockBackwardSig = std::vector<at::Tensor>(MSF_BACKWARD_PARAMS);

// Number of tensor arguments (x + 12 weights) and of gradients the backward returns.
constexpr int kNumWeights = 12;

inline const c10::TypedOperatorHandle<BlockForwardSig>& block_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("msfused::block_forward", "")
                             .typed<BlockForwardSig>();
  return op;
}

inline const c10::TypedOperatorHandle<BlockBackwardSig>& block_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("msfused::block_backward", "")
                             .typed<BlockBackwardSig>();
  return op;
}

}  // namespace msfused
