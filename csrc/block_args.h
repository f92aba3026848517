// Argument checking and description shared by the CPU and CUDA bindings: every problem a
// caller of torch.ops.msfused.* can make is a ValueError/TypeError here, never a crash.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "block_desc.h"

namespace msfused {

struct BlockArgs {
  at::Tensor x;
  at::Tensor wa; std::optional<at::Tensor> ba;
  at::Tensor wb; std::optional<at::Tensor> bb;
  at::Tensor wc; std::optional<at::Tensor> bc;
  at::Tensor pa; std::optional<at::Tensor> qa;
  at::Tensor pb; std::optional<at::Tensor> qb;
  std::optional<at::Tensor> ws; std::optional<at::Tensor> bs;
};

// Bundles the schema's tensor arguments (in schema order).
inline BlockArgs make_block_args(
    const at::Tensor& x, const at::Tensor& wa, const std::optional<at::Tensor>& ba,
    const at::Tensor& wb, const std::optional<at::Tensor>& bb, const at::Tensor& wc,
    const std::optional<at::Tensor>& bc, const at::Tensor& pa,
    const std::optional<at::Tensor>& qa, const at::Tensor& pb,
    const std::optional<at::Tensor>& qb, const std::optional<at::Tensor>& ws,
    const std::optional<at::Tensor>& bs) {
  return BlockArgs{x, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs};
}

// Checks every argument, returns the description and makes x and all weights contiguous
// (x in its own memory format) in place.
BlockDesc check_and_describe(BlockArgs& a, int64_t stride, int64_t merge, int64_t act,
                             bool residual);

// The memory format of the output: the input's.
at::MemoryFormat io_format(const BlockDesc& d);

// Raw pointers of the (contiguous) arguments.
template <typename T>
BlockTensors<T> tensors_of(const BlockArgs& a) {
  auto p = [](const std::optional<at::Tensor>& t) -> const T* {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
  };
  return BlockTensors<T>{a.x.data_ptr<T>(),
                         a.wa.data_ptr<T>(), p(a.ba), a.wb.data_ptr<T>(), p(a.bb),
                         a.wc.data_ptr<T>(), p(a.bc), a.pa.data_ptr<T>(), p(a.qa),
                         a.pb.data_ptr<T>(), p(a.qb), p(a.ws), p(a.bs)};
}

// Gradient tensors of the backward, allocated in the order of the op's output list:
// dx, dwa, dba, dwb, dbb, dwc, dbc, dpa, dqa, dpb, dqb, dws, dbs (dws/dbs empty when no
// projection). Bias gradients are always produced; Python drops those the block lacks.
std::vector<at::Tensor> alloc_grads(const BlockArgs& a, const BlockDesc& d);

template <typename T>
BlockGrads<T> grads_of(std::vector<at::Tensor>& g, const BlockDesc& d) {
  auto p = [](at::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
  return BlockGrads<T>{p(g[0]), p(g[1]), p(g[2]), p(g[3]), p(g[4]), p(g[5]), p(g[6]),
                       p(g[7]), p(g[8]), p(g[9]), p(g[10]),
                       d.projection ? p(g[11]) : nullptr, d.projection ? p(g[12]) : nullptr};
}

// Checks grad_y (output shape) and saved (what the final activation needs) for the
// backward; returns them contiguous in the io format.
void check_backward_extras(const BlockDesc& d, const at::Tensor& x, at::Tensor& grad_y,
                           at::Tensor& saved);

}  // namespace msfused
