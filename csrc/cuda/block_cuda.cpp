// CUDA kernels of msfused::block_forward / block_backward: argument checking (shared with
// the CPU binding), allocation, dtype dispatch and the launch on the current stream. The
// kernels themselves are in block_forward.cu / block_backward.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "block_args.h"
#include "cuda/block_cuda.h"

namespace msfused {
namespace {

// BlockTensors<at::Half> -> BlockTensors<__half> etc. (same bits, different type names).
template <typename U, typename T>
BlockTensors<U> recast(const BlockTensors<T>& t) {
  auto r = [](const T* p) { return reinterpret_cast<const U*>(p); };
  return BlockTensors<U>{r(t.x),  r(t.wa), r(t.ba), r(t.wb), r(t.bb), r(t.wc), r(t.bc),
                         r(t.pa), r(t.qa), r(t.pb), r(t.qb), r(t.ws), r(t.bs)};
}

template <typename U, typename T>
BlockGrads<U> recast(const BlockGrads<T>& g) {
  auto r = [](T* p) { return reinterpret_cast<U*>(p); };
  return BlockGrads<U>{r(g.dx),  r(g.dwa), r(g.dba), r(g.dwb), r(g.dbb), r(g.dwc), r(g.dbc),
                       r(g.dpa), r(g.dqa), r(g.dpb), r(g.dqb), r(g.dws), r(g.dbs)};
}

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor for the CUDA kernels, got one on ",
                    x.device());
}

template <typename T, typename U>
void forward_typed(const BlockDesc& d, const BlockArgs& a, at::Tensor& y, at::Tensor& pre,
                   cudaStream_t st) {
  // float32 on TF32 tensor cores exactly where eager's convolutions would use them
  const bool tf32 = at::globalContext().allowTF32CuDNN();
  const char* err = cuda::launch_block_forward<U>(
      d, recast<U>(tensors_of<T>(a)), reinterpret_cast<U*>(y.data_ptr<T>()),
      pre.numel() ? reinterpret_cast<U*>(pre.data_ptr<T>()) : nullptr, tf32, st);
  TORCH_CHECK(err == nullptr, "msfused block_forward (CUDA): ", err);
}

std::tuple<at::Tensor, at::Tensor> block_forward_cuda(MSF_FORWARD_PARAMS) {
  BlockArgs a = make_block_args(x, MSF_WEIGHT_ARGS);
  const BlockDesc d = check_and_describe(a, MSF_CONFIG_ARGS);
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(a.x->device());
  auto opts = a.x->options().memory_format(io_format(d));
  at::Tensor y = at::empty({d.B, d.Cout, d.Ho, d.Wo}, opts);
  at::Tensor pre = save_preact ? at::empty({d.B, d.Cout, d.Ho, d.Wo}, opts)
                               : at::empty({0}, a.x->options());
  if (y.numel() == 0) return {y, pre};
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  switch (a.x->scalar_type()) {
    case at::kFloat: forward_typed<float, float>(d, a, y, pre, st); break;
    case at::kDouble: forward_typed<double, double>(d, a, y, pre, st); break;
    case at::kHalf: forward_typed<at::Half, __half>(d, a, y, pre, st); break;
    case at::kBFloat16: forward_typed<at::BFloat16, __nv_bfloat16>(d, a, y, pre, st); break;
    default:
      TORCH_CHECK_TYPE(false, "x: the CUDA kernels support float32, float64, float16 and "
                       "bfloat16, got ", a.x->scalar_type());
  }
  return {y, pre};
}

template <typename T, typename U>
void backward_typed(const BlockDesc& d, const BlockArgs& a, const at::Tensor& gy,
                    const at::Tensor& saved, std::vector<at::Tensor>& grads, cudaStream_t st) {
  // TF32 for float32 exactly where eager's convolution backward would use it
  const bool tf32 = at::globalContext().allowTF32CuDNN();
  const size_t bytes = cuda::block_backward_workspace_bytes(d, sizeof(T));
  at::Tensor work = at::empty({static_cast<int64_t>(bytes)}, a.x->options().dtype(at::kByte));
  const char* err = cuda::launch_block_backward<U>(
      d, recast<U>(tensors_of<T>(a)), reinterpret_cast<const U*>(gy.data_ptr<T>()),
      act_saves(d.act) == kSavesNothing ? nullptr : reinterpret_cast<const U*>(saved.data_ptr<T>()),
      recast<U>(grads_of<T>(grads, d)), work.data_ptr(), tf32, st);
  TORCH_CHECK(err == nullptr, "msfused block_backward (CUDA): ", err);
}

std::vector<at::Tensor> block_backward_cuda(MSF_BACKWARD_PARAMS) {
  BlockArgs a = make_block_args(x, MSF_WEIGHT_ARGS);
  const BlockDesc d = check_and_describe(a, MSF_CONFIG_ARGS);
  check_cuda(x);
  TensorRef gy = TensorRef::borrowed(grad_y), sv = TensorRef::borrowed(saved);
  check_backward_extras(d, *a.x, gy, sv);
  const c10::cuda::CUDAGuard guard(a.x->device());
  std::vector<at::Tensor> grads = alloc_grads(a, d);
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  switch (a.x->scalar_type()) {
    case at::kFloat: backward_typed<float, float>(d, a, *gy, *sv, grads, st); break;
    case at::kDouble: backward_typed<double, double>(d, a, *gy, *sv, grads, st); break;
    case at::kHalf: backward_typed<at::Half, __half>(d, a, *gy, *sv, grads, st); break;
    case at::kBFloat16: backward_typed<at::BFloat16, __nv_bfloat16>(d, a, *gy, *sv, grads, st); break;
    default:
      TORCH_CHECK_TYPE(false, "x: the CUDA kernels support float32, float64, float16 and "
                       "bfloat16, got ", a.x->scalar_type());
  }
  return grads;
}

}  // namespace
}  // namespace msfused

TORCH_LIBRARY_IMPL(msfused, CUDA, m) {
  m.impl("block_forward", &msfused::block_forward_cuda);
  m.impl("block_backward", &msfused::block_backward_cuda);
}
