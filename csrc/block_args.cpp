#include "block_args.h"

#include <ATen/ATen.h>

namespace msfused {
namespace {

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& x,
                  at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ",
                   x.scalar_type(), " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected a tensor on ", x.device(),
                    " (the device of x), got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

void check_opt(const char* name, const TensorRef& t, const at::Tensor& x,
               at::IntArrayRef shape) {
  if (t->defined()) check_tensor(name, *t, x, shape);
}

// t made contiguous (in `fmt`): still borrowed when it already is.
void make_contiguous(TensorRef& t, at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  if (t->defined() && !t->is_contiguous(fmt)) t = TensorRef::owned(t->contiguous(fmt));
}

bool suggests_channels_last(const at::Tensor& x) {
  // Same rule as msfused/layout.py: NHWC when channels are innermost and C > 1.
  if (x.is_contiguous()) return x.size(1) > 1 && x.stride(1) == 1;
  return x.stride(1) == 1;
}

}  // namespace

TensorRef borrow(const std::optional<at::Tensor>& t) {
  static const at::Tensor kAbsent;
  return TensorRef::borrowed(t.has_value() ? *t : kAbsent);
}

BlockDesc check_and_describe(BlockArgs& a, int64_t stride, int64_t merge, int64_t act,
                             bool residual) {
  const at::Tensor& x = *a.x;
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D tensor (B, C, H, W), got ", x.dim(),
                    "-D with shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "x: expected a floating dtype, got ", x.scalar_type());
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK_VALUE(x.size(i) >= 1, "x: expected every dimension >= 1, got shape ", x.sizes());
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride: expected 1 or 2, got ", stride);
  TORCH_CHECK_VALUE(merge == kConcat || merge == kAdd,
                    "merge: expected 0 (concat) or 1 (add), got ", merge);
  TORCH_CHECK_VALUE(act_valid(act), "act: expected one of ", kActivationList, "got ", act);
  TORCH_CHECK_VALUE(a.wa->dim() == 4, "wa: expected a (C, 1, 3, 3) tensor, got ", a.wa->sizes());
  TORCH_CHECK_VALUE(a.pa->dim() == 4, "pa: expected a (N, C, 1, 1) tensor, got ", a.pa->sizes());
  const int64_t C = x.size(1), N = a.pa->size(0);
  TORCH_CHECK_VALUE(N >= 1, "pa: expected at least one output channel (N >= 1), got shape ",
                    a.pa->sizes());
  TORCH_CHECK_VALUE(a.wa->size(0) == C, "x: expected ", a.wa->size(0),
                    " channels (the weights' in_channels), got ", C);
  const int64_t Cout = merge == kConcat ? 2 * N : N;
  check_tensor("wa", *a.wa, x, {C, 1, 3, 3});
  check_tensor("wb", *a.wb, x, {C, 1, 3, 3});
  check_tensor("wc", *a.wc, x, {C, 1, 3, 3});
  check_tensor("pa", *a.pa, x, {N, C, 1, 1});
  check_tensor("pb", *a.pb, x, {N, C, 1, 1});
  check_opt("ba", a.ba, x, {C});
  check_opt("bb", a.bb, x, {C});
  check_opt("bc", a.bc, x, {C});
  check_opt("qa", a.qa, x, {N});
  check_opt("qb", a.qb, x, {N});
  const bool projection = residual && (stride != 1 || Cout != C);
  if (projection) {
    TORCH_CHECK_VALUE(a.ws->defined(), "ws: this residual block needs a (", Cout, ", ", C,
                      ", 1, 1) projection weight, got None");
    check_tensor("ws", *a.ws, x, {Cout, C, 1, 1});
    check_opt("bs", a.bs, x, {Cout});
  } else {
    TORCH_CHECK_VALUE(!a.ws->defined() && !a.bs->defined(),
                      "ws: expected None (no projection shortcut), got a tensor");
  }
  for (TensorRef* t : {&a.wa, &a.ba, &a.wb, &a.bb, &a.wc, &a.bc, &a.pa, &a.qa, &a.pb, &a.qb,
                       &a.ws, &a.bs})
    make_contiguous(*t);

  BlockDesc d;
  d.B = x.size(0); d.C = C; d.H = x.size(2); d.W = x.size(3);
  d.N = N; d.Cout = Cout;
  d.Ho = (d.H - 1) / stride + 1; d.Wo = (d.W - 1) / stride + 1;
  d.stride = static_cast<int>(stride); d.merge = static_cast<int>(merge);
  d.act = static_cast<int>(act); d.residual = residual; d.projection = projection;
  d.channels_last = suggests_channels_last(x);
  make_contiguous(a.x, io_format(d));
  return d;
}

BlockArgs cast_block_args(const BlockArgs& a, at::ScalarType dtype) {
  auto c = [dtype](const TensorRef& t) {
    return t->defined() ? TensorRef::owned(t->to(dtype)) : TensorRef::borrowed(*t);
  };
  return BlockArgs{c(a.x),  c(a.wa), c(a.ba), c(a.wb), c(a.bb), c(a.wc), c(a.bc),
                   c(a.pa), c(a.qa), c(a.pb), c(a.qb), c(a.ws), c(a.bs)};
}

at::MemoryFormat io_format(const BlockDesc& d) {
  return d.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

std::vector<at::Tensor> alloc_grads(const BlockArgs& a, const BlockDesc& d, at::Tensor dx) {
  auto opts = a.x->options();
  auto e = at::empty({0}, opts);
  return {dx.defined() ? std::move(dx) : at::empty_like(*a.x, io_format(d)),
          at::empty_like(*a.wa), at::empty({d.C}, opts),
          at::empty_like(*a.wb), at::empty({d.C}, opts),
          at::empty_like(*a.wc), at::empty({d.C}, opts),
          at::empty_like(*a.pa), at::empty({d.N}, opts),
          at::empty_like(*a.pb), at::empty({d.N}, opts),
          d.projection ? at::empty({d.Cout, d.C, 1, 1}, opts) : e,
          d.projection ? at::empty({d.Cout}, opts) : e};
}

void check_backward_extras(const BlockDesc& d, const at::Tensor& x, TensorRef& grad_y_ref,
                           TensorRef& saved_ref) {
  const at::Tensor& grad_y = *grad_y_ref;
  const at::Tensor& saved = *saved_ref;
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef({d.B, d.Cout, d.Ho, d.Wo}),
                    "grad_y: expected shape ", at::IntArrayRef({d.B, d.Cout, d.Ho, d.Wo}),
                    ", got ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "grad_y: expected dtype ",
                   x.scalar_type(), ", got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), "grad_y: expected device ", x.device(),
                    ", got ", grad_y.device());
  if (act_saves(d.act) == kSavesNothing) {
    make_contiguous(grad_y_ref, io_format(d));
    return;
  }
  TORCH_CHECK_VALUE(saved.sizes() == grad_y.sizes(), "saved: expected shape ", grad_y.sizes(),
                    " (the ", act_saves(d.act) == kSavesOutput ? "output" : "pre-activation",
                    ", which the gradient of ", act_name(d.act), " reads), got ",
                    saved.sizes());
  TORCH_CHECK_TYPE(saved.scalar_type() == x.scalar_type(), "saved: expected dtype ",
                   x.scalar_type(), ", got ", saved.scalar_type());
  TORCH_CHECK_VALUE(saved.device() == x.device(), "saved: expected device ", x.device(),
                    ", got ", saved.device());
  make_contiguous(grad_y_ref, io_format(d));
  make_contiguous(saved_ref, io_format(d));
}

}  // namespace msfused
