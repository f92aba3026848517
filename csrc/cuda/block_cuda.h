// Launchers of the CUDA kernels (csrc/cuda/*.cu). Plain C++: the binding (block_cuda.cpp)
// includes this without the kernels and the kernels include no PyTorch headers.
// Each launcher returns nullptr on success or a static error message.
#pragma once
#ifndef MSFUSED_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cstddef>

#include "block_desc.h"
#include "forward_mma_plan.h"

namespace msfused {
namespace cuda {

// y and pre are in the io layout (NHWC when d.channels_last, else NCHW); pre may be null.
// allow_tf32: float32 may run its pointwise GEMM on TF32 tensor cores (the binding passes
// torch.backends.cudnn.allow_tf32, the flag eager's convolutions obey); else exact FMAs.
template <typename T>
const char* launch_block_forward(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                                 bool allow_tf32, cudaStream_t stream);

// The one-launch forward (block_forward_mma.cu) that launch_block_forward calls: its GEMM on
// tensor cores, for float32 on TF32 where tf32 allows, else on FMAs in exact float32, for
// float64 on FMAs; its plan for a call (the emulator's tables). *launched is false (and
// nothing runs) when no tile fits the device's shared memory (very large C): the caller runs
// the older FMA kernel then (block_forward.cu).
template <typename T>
const char* launch_block_forward_mma(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                                     bool tf32, cudaStream_t stream, bool* launched);
template <typename T>
MmaPlan plan_forward_mma(const BlockDesc& d, const BlockTensors<T>& t, const T* y,
                         const MmaDevice& dev);
MmaDevice mma_device();  // the current device's shared memory and SM count

// Scratch the backward needs, in bytes, for element size elem_bytes (2, 4 or 8).
size_t block_backward_workspace_bytes(const BlockDesc& d, int elem_bytes);

// grad_y and saved in the io layout (saved null for act none); workspace of
// block_backward_workspace_bytes(d, sizeof(T)) bytes, 256-byte aligned.
// allow_tf32: float32 may run the backward's GEMMs on TF32 (as for the forward).
template <typename T>
const char* launch_block_backward(const BlockDesc& d, const BlockTensors<T>& t, const T* grad_y,
                                  const T* saved, const BlockGrads<T>& g, void* workspace,
                                  bool allow_tf32, cudaStream_t stream);

}  // namespace cuda
}  // namespace msfused
