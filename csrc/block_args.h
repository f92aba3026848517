// Argument checking and description shared by the CPU and CUDA bindings: every problem a
// caller of torch.ops.msfused.* can make is a ValueError/TypeError here, never a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/MaybeOwned.h>

#include <optional>
#include <vector>

#include "block_desc.h"
#include "op_signature.h"

namespace msfused {

using TensorRef = c10::MaybeOwned<at::Tensor>;

// The schema's tensor arguments (in schema order), borrowed from the caller; an argument
// that has to be converted (made contiguous, widened) holds its own copy. Borrowing
// matters: every C++ copy of a tensor that Python owns takes the GIL when it is dropped.
// An absent optional argument (a bias, the projection) is an undefined tensor.
struct BlockArgs {
  TensorRef x, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs;
};

TensorRef borrow(const std::optional<at::Tensor>& t);

inline BlockArgs make_block_args(const at::Tensor& x, MSF_WEIGHT_PARAMS) {
  auto b = [](const at::Tensor& t) { return TensorRef::borrowed(t); };
  return BlockArgs{b(x),  b(wa), borrow(ba), b(wb), borrow(bb), b(wc), borrow(bc),
                   b(pa), borrow(qa), b(pb), borrow(qb), borrow(ws), borrow(bs)};
}

// The same arguments with every tensor converted to dtype (layouts kept).
BlockArgs cast_block_args(const BlockArgs& a, at::ScalarType dtype);

// The one validation of a direct operator call (SPEC section 4): every argument checked,
// each problem a ValueError/TypeError naming the argument. Returns the description and
// makes x and all weights contiguous (x in its own memory format) in place.
BlockDesc check_and_describe(BlockArgs& a, int64_t stride, int64_t merge, int64_t act,
                             bool residual);

// The memory format of the output: the input's.
at::MemoryFormat io_format(const BlockDesc& d);

// Raw pointers of the (contiguous) arguments; null for absent ones.
template <typename T>
BlockTensors<T> tensors_of(const BlockArgs& a) {
  auto p = [](const TensorRef& t) -> const T* {
    return t->defined() ? t->data_ptr<T>() : nullptr;
  };
  return BlockTensors<T>{p(a.x),  p(a.wa), p(a.ba), p(a.wb), p(a.bb), p(a.wc), p(a.bc),
                         p(a.pa), p(a.qa), p(a.pb), p(a.qb), p(a.ws), p(a.bs)};
}

// Gradient tensors of the backward, allocated in the order of the op's output list:
// dx, dwa, dba, dwb, dbb, dwc, dbc, dpa, dqa, dpb, dqb, dws, dbs (dws/dbs empty when no
// projection). Bias gradients are always produced; autograd drops those the block lacks.
// dx is `dx` when given (the CPU op's may come from its output cache), else a new tensor.
std::vector<at::Tensor> alloc_grads(const BlockArgs& a, const BlockDesc& d,
                                    at::Tensor dx = at::Tensor());

template <typename T>
BlockGrads<T> grads_of(std::vector<at::Tensor>& g, const BlockDesc& d) {
  auto p = [](at::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
  return BlockGrads<T>{p(g[0]), p(g[1]), p(g[2]), p(g[3]), p(g[4]), p(g[5]), p(g[6]),
                       p(g[7]), p(g[8]), p(g[9]), p(g[10]),
                       d.projection ? p(g[11]) : nullptr, d.projection ? p(g[12]) : nullptr};
}

// Checks grad_y (output shape) and saved (what the final activation's gradient reads) for
// the backward; makes them contiguous in the io format.
void check_backward_extras(const BlockDesc& d, const at::Tensor& x, TensorRef& grad_y,
                           TensorRef& saved);

}  // namespace msfused
