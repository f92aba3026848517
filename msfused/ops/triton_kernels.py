"""Triton kernels of the block (SPEC section 1): one forward launch, five backward launches.

The kernels live in msfused/ops/triton_forward.py and msfused/ops/triton_backward.py, their
shared jit building blocks in msfused/ops/triton_jit.py; this module is the design and the
one namespace the op wrappers (msfused/ops/triton_ops.py) launch from. Importing it imports
triton; msfused imports it at `import msfused` when Triton is installed, not at all otherwise.

Layout
------
Every kernel takes x (and y, dx) through four strides (batch, channel, row, column), so
NCHW and NHWC (channels_last) run the same code; NHWC is the fast path because a tile's
channel vector is contiguous there. Weights are made contiguous by the wrapper:
depthwise (C,1,3,3) is read as w[c*9 + k], pointwise (N,C,1,1) as w[n*C + c].

The row strip (forward and the backward's branch kernel)
-------------------------------------------------------
A program owns a strip of 4 output rows x BW output columns of one image (BW = 8 when
Wo <= 8, else 16, chosen by the host: the dots' M = 4*BW is 32 or 64), grid axis 0 =
(image, strip, column block), so B has no 65535 limit. Branch B's second conv needs b1 at
the 8 neighbours of each output pixel, and Triton can neither shift a register tile nor
address shared memory, so b1 comes from a roll down the strip (`_strip_branches`): each of
the strip's 6 b1 rows (r0-1 .. r0+4) is computed once, at the three column shifts the
second conv reads, and used by the up to three output rows around it. The x tiles a row
needs (3 rows x (2S+3) column offsets) are loaded once and feed a, all three b1 shifts and
the projection's input. The strip is assembled into [4*BW, BLOCK_C] tiles (tl.join,
permute, reshape) for the dots.

Loads of x and FMAs per output pixel and input channel (per program of an N tile):

| forward algorithm                                   | x loads, S=1 | S=2  | FMAs |
|-----------------------------------------------------|--------------|------|------|
| before: b1 recomputed at the 9 neighbours           | 90           | 90   | 99   |
| chosen: roll down a 4-row strip                     | 22.5         | 31.5 | 58.5 |
| alternative: b1 of tile+halo staged in global scratch | 33 + 1.7 st. | 33 | 36 |
| alternative: also roll x rows in registers          | 10           | 22.75 | 58.5 |

(Chosen: 6 row steps x 3 x (2S+3) tile loads per 4 rows; FMAs (4 x 36 + 2 x 27) / 4 for a
and the three b1 shifts, plus 9 for b. Scratch, for the same 4 x 16 tile: 9 for a, 9 x the
halo factor 6*18/64 for b1, 9 scratch loads for b. Rolling x: each x row of the strip's
span (8 at S=1, 13 at S=2) once, at its 2S+3 offsets. The "before" row counts both concat halves: the old
kernel gave branch A and branch B separate programs, 9 and 81 loads.) Why not the scratch:
it needs a CTA-wide barrier that orders global stores before shifted global loads inside one
program (tl.debug_barrier, whose memory semantics are not part of Triton's contract), a
grid-sized scratch allocation, and its ordering cannot be checked without a GPU: the
interpreter runs a program as whole-array numpy operations, so a missing barrier passes
there. The roll is pure dataflow, which the interpreter checks exactly. Why not rolling x
too: 15 loop-carried [BW, BLOCK_C] tiles on top of the 9 b1 tiles would spill; the x tiles
are re-read from L1 instead.

Forward (`_fwd_kernel`, ONE launch). Axis 1 enumerates BLOCK_N-wide tiles of the N output
channels of a branch. A program computes both branches for its strip once per input-channel
chunk of BLOCK_C and feeds them to tl.dot against [BLOCK_C, BLOCK_N] tiles of the pointwise
(projection) weights: for merge="concat" two fp32 accumulators (pa half, pb half: separate
dots, so a NaN/inf in one branch cannot leak into the other half), for merge="add" one
accumulator that both dots feed (per chunk one K = 2*BLOCK_C reduction). The host caps
4*BW x BLOCK_N x (accumulators) at 8192 fp32 (64 registers a thread at 4 warps) and keeps
BLOCK_N >= 16; for N beyond the cap the depthwise work is repeated per N tile. The epilogue
adds pointwise/projection biases, the identity residual, applies the activation, and
writes y (and, for silu training, the pre-activation) once, in x's memory format.

Backward (five launches plus reductions of per-program partials, all deterministic: no
atomics, a fixed reduction order for a given shape):
  1. `_gz_kernel`: gz = grad_y * act'(saved) -> fp32 scratch [B, Ho*Wo, C_out].
  2. `_bwd_branch_kernel` (strip x channel tile): recomputes a, b with the forward's roll
     (22.5 x loads per pixel-channel at S=1, before 90), da = gz_a @ Pa and db = gz_b @ Pb
     with tl.dot over N chunks, da_pre/db_pre = d * act'(pre); writes a, b (in x's dtype:
     only the weight-gradient dots read them, rounded to it anyway), da_pre, db_pre (fp32)
     to scratch and per-program partials of dWa, dba (9 more x loads).
  3. `_bwd_b1_kernel`: recomputes b1 at its own pixels (9 loads), reads db_pre of the 9
     neighbours from scratch: db1 (transposed stride-1 depthwise), partials of dWc, dbc;
     db1_pre; its partials of dWb, dbb; writes db1_pre.
  4. `_bwd_dx_kernel` (input-pixel tile): transposed stride-s depthwise of da_pre and
     db1_pre, plus the identity residual (gz) or the projection (gz @ Ws with tl.dot).
  5. `_pw_grad_kernel` (launched once per pointwise weight: pa, pb, and ws when present):
     dW = gz^T @ a / b / xs over all pixels with tl.dot, split into a fixed number of row
     ranges whose partials are summed in order.
Bias grads of the pointwise layers are torch sums over the gz scratch.

Precision: depthwise math and every accumulator are fp32. float32 inputs use
`tl.dot(..., input_precision="ieee")` unless torch.backends.cudnn.allow_tf32 is on (the
flag eager's 1x1 convolutions obey; then tf32, Triton's default); float16/bfloat16 feed
tl.dot operands rounded to the input dtype (tensor cores), as eager PyTorch rounds its
intermediates. tl.dot needs every dimension >= 16: M = 4*BW >= 32, BLOCK_C, BLOCK_N,
BLOCK_R >= 16, and masked loads pad with zeros.

Autotuning: small config sets (BLOCK_C, num_warps) keyed on the shapes, dtype and config;
`MSFUSED_TRITON_VERBOSE=1` prints each kernel's choice once per key (msfused.ops.triton_ops).

Indexing: per-image offsets are int32, the image offset int64; the wrapper refuses an image
(C*H*W or C_out*Ho*Wo) of 2^31 elements or more with a clear error.

Interpreter (TRITON_INTERPRET=1) limits, where they bite:
  * it runs programs one after another in numpy: the tests use small shapes only;
  * autotuning is pointless there, so every autotune list collapses to its first config;
  * float16/bfloat16 are emulated through numpy, slower still; tl.dot of float32 is
    numpy's matmul (exact ieee, so the float32 suite tolerance of 2e-5 holds);
  * tl.dot on bfloat16 operands is wrong in the interpreter (it multiplies the raw bits),
    so under the interpreter every dot upcasts its (already rounded) operands to fp32
    (`_INTERP_DOT_FP32`); the tensor-core path for fp16/bf16 is therefore NOT exercised
    without a GPU;
  * performance, register pressure, tf32 and num_warps/num_stages mean nothing there.
    The compiled form is checked offline instead: tools/triton_sass.py compiles every
    kernel for sm_90 with Triton's own ptxas (no GPU needed) and reports registers,
    spills, shared memory and the HMMA/LDSM counts of the SASS.
"""
from __future__ import annotations

from .triton_backward import (_bwd_b1_kernel, _bwd_branch_kernel, _bwd_dx_kernel,
                              _gz_kernel, _pw_grad_kernel)
from .triton_forward import _fwd_kernel
from .triton_jit import INTERPRET, STRIP_ROWS, _act, _act_grad

__all__ = ["INTERPRET", "STRIP_ROWS", "_act", "_act_grad", "_fwd_kernel", "_gz_kernel",
           "_bwd_branch_kernel", "_bwd_b1_kernel", "_bwd_dx_kernel", "_pw_grad_kernel"]
