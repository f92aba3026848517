// The shape and configuration of one block call, as plain C++ (no PyTorch headers) so the
// CPU kernels and the CUDA .cu files share it without paying for ATen's headers.
#pragma once
#include <cstdint>

#include "activations.h"  // enum Act

namespace msfused {

// The codes of the schemas' `merge` argument (msfused/config.py MERGES: code = index).
enum Merge : int { kConcat = 0, kAdd = 1 };

struct BlockDesc {
  int64_t B, C, H, W;     // input
  int64_t N, Cout;        // branch width, output channels (2N concat, N add)
  int64_t Ho, Wo;         // output spatial size: (H - 1) / stride + 1
  int stride;             // 1 or 2
  int merge;              // Merge
  int act;                // Act (csrc/activations.h)
  bool residual;          // add a shortcut before the final activation
  bool projection;        // the shortcut is a 1x1 conv (ws, bs) rather than the identity
  bool channels_last;     // x, y (and grads) are NHWC in memory; else NCHW
};

// Pointers of one call. Biases and the projection are null when absent. Weights are
// contiguous in nn.Conv2d shapes: depthwise (C,1,3,3) = C*9, pointwise (N,C), ws (Cout,C).
template <typename T>
struct BlockTensors {
  const T* x;
  const T* wa; const T* ba;
  const T* wb; const T* bb;
  const T* wc; const T* bc;
  const T* pa; const T* qa;
  const T* pb; const T* qb;
  const T* ws; const T* bs;
};

// Gradients written by the backward (same layout as the tensors above).
template <typename T>
struct BlockGrads {
  T* dx;
  T* dwa; T* dba;
  T* dwb; T* dbb;
  T* dwc; T* dbc;
  T* dpa; T* dqa;
  T* dpb; T* dqb;
  T* dws; T* dbs;  // null without projection
};

}  // namespace msfused
