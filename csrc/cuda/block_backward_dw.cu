// Launch 2 of the float16/bfloat16 backward (backward_mma.h): from the pixel-major scratch
// (da = dL/da_pre, db = dL/db_pre) and the shortcut's share that launch 1 left in dx, the
// depthwise gradients: dx, and one partial of the depthwise weight/bias gradients per input
// tile.
//
// One CTA per (image, DT x DT input tile, block of KB channels). Everything it needs is staged
// in shared memory channel-interleaved, [position][KB], so a thread's channel is tid % KB in
// every phase and a warp reads consecutive words:
//   x   input rows/cols R0-s-1 .. R0+DT+1 (XR): b1_pre on the 1-ring and the dwa/dwb taps
//   db  output tile plus a 2-ring (OB): db1 on the 1-ring
//   da  output tile plus a 1-ring (ON): dx and dwa/dba
//   dxs the owned outputs (OS): the shortcut's share of dx, which launch 1 left in dx
// then computes b1 and db1 (accumulation type) on the 1-ring, accumulates the partials over
// the owned outputs in registers, and produces dx. Global traffic goes through ldg / stg
// (global_io.cuh) with a channel-fastest mapping for the pixel-major scratch and NHWC tensors
// (each KB-channel run is one 32-byte segment for 2-byte types) and a pixel-fastest one for
// NCHW x and dx (dx is staged transposed so that mapping costs no bank conflicts).
//
// The tile with input rows [R0, R0+DT) owns the outputs [R0/s, R0/s + DT/s) (DT is a multiple
// of s), so the tiles partition the outputs and each output's contribution to the weight
// gradients lands in exactly one partial. Sums run in a fixed order (per thread over a fixed
// pixel sequence, then over the thread groups in order): no atomics, same bits every run.
#include "backward_mma.h"
#include "common.cuh"
#include "global_io.cuh"
#include "ptx_wrappers.cuh"

namespace msfused {
namespace cuda {
namespace {

constexpr int DW_DT = 16;   // input tile edge, a multiple of the stride
constexpr int DW_NT = 256;  // threads per CTA
constexpr int DW_NW = 28;   // staged weights per channel: wa[9] wb[9] wc[9] bb

// Channels per CTA. float64 (a test dtype) takes 8 so its shared memory stays within the
// 227 KB opt-in limit.
template <typename T> struct DwKB { static constexpr int value = 16; };
template <> struct DwKB<double> { static constexpr int value = 8; };

template <int S>
struct DwGeo {
  static constexpr int OS = DW_DT / S;      // owned output rows (cols)
  static constexpr int ON = OS + 2;         // plus a 1-ring: da, db1, b1
  static constexpr int OB = OS + 4;         // plus a 2-ring: db
  static constexpr int XR = DW_DT + S + 3;  // input rows R0-S-1 .. R0+DT+1
  // dx staged per channel for the NCHW store; the odd word stride keeps both the
  // channel-fastest writes and the pixel-fastest reads free of bank conflicts.
  template <typename T>
  static constexpr int stage_ld() {
    return DW_DT * DW_DT + (sizeof(T) == 2 ? 2 : 1);
  }
};

// Byte offsets of the shared-memory sections. The partials' reduction buffer reuses the
// sections of x, db and b1, which nothing reads any more once the partials are accumulated.
struct DwMap {
  unsigned x, db, b1, red, da, db1, dxs, w, stage, total;
};

inline unsigned align128(size_t v) { return static_cast<unsigned>((v + 127) / 128 * 128); }

template <typename T, int S>
DwMap dw_map(bool residual, bool nchw) {
  using A = typename AccT<T>::type;
  using G = DwGeo<S>;
  constexpr int KB = DwKB<T>::value, NG = DW_NT / KB;
  DwMap m;
  unsigned off = 0;
  m.x = off;
  off += align128(size_t(G::XR) * G::XR * KB * sizeof(T));
  m.db = off;
  off += align128(size_t(G::OB) * G::OB * KB * sizeof(T));
  m.b1 = off;
  off += align128(size_t(G::ON) * G::ON * KB * sizeof(A));
  m.red = 0;
  const unsigned red = align128(size_t(NG) * BWD_NDW * KB * sizeof(A));
  if (off < red) off = red;
  m.da = off;
  off += align128(size_t(G::ON) * G::ON * KB * sizeof(T));
  m.db1 = off;
  off += align128(size_t(G::ON) * G::ON * KB * sizeof(A));
  m.dxs = off;
  off += residual ? align128(size_t(G::OS) * G::OS * KB * sizeof(T)) : 0;
  m.w = off;
  off += align128(size_t(DW_NW) * KB * sizeof(A));
  m.stage = off;
  off += nchw ? align128(size_t(KB) * G::template stage_ld<T>() * sizeof(T)) : 0;
  m.total = off;
  return m;
}

template <typename T, int S>
__global__ void __launch_bounds__(DW_NT)
    dw_backward_kernel(BlockDesc d, BlockTensors<T> t, const T* __restrict__ da,
                       const T* __restrict__ db, T* __restrict__ dx,
                       typename AccT<T>::type* __restrict__ dw_part, DwMap m, int tiles_w,
                       int tiles_hw, int cblocks) {
  using A = typename AccT<T>::type;
  using G = DwGeo<S>;
  constexpr int KB = DwKB<T>::value, NG = DW_NT / KB;
  constexpr int OS = G::OS, ON = G::ON, OB = G::OB, XR = G::XR, DT = DW_DT;
  constexpr int SLD = G::template stage_ld<T>();
  MSF_EXTERN_SMEM(smem);
  T* xs = reinterpret_cast<T*>(smem + m.x);
  T* dbs = reinterpret_cast<T*>(smem + m.db);
  A* b1s = reinterpret_cast<A*>(smem + m.b1);
  A* red = reinterpret_cast<A*>(smem + m.red);
  T* das = reinterpret_cast<T*>(smem + m.da);
  A* db1s = reinterpret_cast<A*>(smem + m.db1);
  T* dxss = reinterpret_cast<T*>(smem + m.dxs);
  A* ws = reinterpret_cast<A*>(smem + m.w);
  T* stage = reinterpret_cast<T*>(smem + m.stage);

  // may start before launch 1 completes (MSF_LAUNCH_PDL): nothing global before this; and
  // launch 3 may be launched now (it waits for this launch in turn)
  ptx::grid_dependency_wait();
  ptx::launch_dependents();
  const int tid = threadIdx.x, kc = tid % KB, grp = tid / KB;
  // The channel blocks of a tile run side by side, and the tiles in reverse order: launch 1
  // wrote the scratch group after group, so the tiles it wrote last, the ones still in L2,
  // are read first (NOTES 33). part stays the tile's own index: the partials' reduction
  // order, and so every bit, is that of any other order.
  const unsigned ncb = unsigned(cblocks), nparts = gridDim.x / ncb;
  const int cb = static_cast<int>(blockIdx.x % ncb);
  const int part = static_cast<int>(nparts - 1 - blockIdx.x / ncb);
  const int b = part / tiles_hw, trem = part % tiles_hw;
  const int R0 = (trem / tiles_w) * DT, Q0 = (trem % tiles_w) * DT;
  const int o0 = R0 / S, p0 = Q0 / S;  // first owned output row / col
  const int H = static_cast<int>(d.H), W = static_cast<int>(d.W), C = static_cast<int>(d.C);
  const int Ho = static_cast<int>(d.Ho), Wo = static_cast<int>(d.Wo);
  const int c0 = cb * KB, c = c0 + kc;
  const bool cl = d.channels_last, residual = d.residual;
  const int act = d.act;
  // 64-bit image bases, 32-bit offsets inside an image (the launcher checks C*H*W < 2^31).
  const int HW = H * W;
  const T* xb = t.x + int64_t(b) * C * HW;
  T* dxb = dx + int64_t(b) * C * HW;
  const int64_t obase = int64_t(b) * Ho * Wo * C;
  const T* dab = da + obase;
  const T* dbb = db + obase;
  const T zero = from_acc<T>(A(0));

  // ---- stage -------------------------------------------------------------------------------
  for (int idx = tid; idx < DW_NW * KB; idx += DW_NT) {
    const int k = idx % DW_NW, cc = c0 + idx / DW_NW;  // k fastest: wa/wb/wc rows contiguous
    A v = A(0);
    if (cc < C) {
      if (k < 27) {
        const T* w = k < 9 ? t.wa : (k < 18 ? t.wb : t.wc);
        v = to_acc(ldg(w + cc * 9 + k % 9));
      } else if (t.bb != nullptr) {
        v = to_acc(ldg(t.bb + cc));
      }
    }
    ws[k * KB + idx / DW_NW] = v;
  }
  const int hx0 = R0 - S - 1, wx0 = Q0 - S - 1;
  if (cl) {
    for (int idx = tid; idx < XR * XR * KB; idx += DW_NT) {
      const int p = idx / KB, h = hx0 + p / XR, w = wx0 + p % XR;
      xs[idx] = (c < C && h >= 0 && h < H && w >= 0 && w < W) ? ldg(xb + (h * W + w) * C + c)
                                                               : zero;
    }
  } else {
    for (int idx = tid; idx < XR * XR * KB; idx += DW_NT) {
      const int p = idx % (XR * XR), k = idx / (XR * XR);
      const int h = hx0 + p / XR, w = wx0 + p % XR;
      xs[p * KB + k] = (c0 + k < C && h >= 0 && h < H && w >= 0 && w < W)
                           ? ldg(xb + (c0 + k) * HW + h * W + w)
                           : zero;
    }
  }
  for (int idx = tid; idx < OB * OB * KB; idx += DW_NT) {
    const int p = idx / KB, oh = o0 - 2 + p / OB, ow = p0 - 2 + p % OB;
    dbs[idx] = (c < C && oh >= 0 && oh < Ho && ow >= 0 && ow < Wo)
                   ? ldg(dbb + (oh * Wo + ow) * C + c)
                   : zero;
  }
  for (int idx = tid; idx < ON * ON * KB; idx += DW_NT) {
    const int p = idx / KB, oh = o0 - 1 + p / ON, ow = p0 - 1 + p % ON;
    das[idx] = (c < C && oh >= 0 && oh < Ho && ow >= 0 && ow < Wo)
                   ? ldg(dab + (oh * Wo + ow) * C + c)
                   : zero;
  }
  // the shortcut's gradient at the owned outputs, from dx at their input pixels (S oh, S ow)
  // where launch 1 put it: this CTA reads the dx elements it owns before the barrier below
  // and writes them after, and no other CTA touches them
  if (residual && cl) {
    for (int idx = tid; idx < OS * OS * KB; idx += DW_NT) {
      const int p = idx / KB, oh = o0 + p / OS, ow = p0 + p % OS;
      dxss[idx] = (c < C && oh < Ho && ow < Wo) ? ld(dxb + (S * oh * W + S * ow) * C + c)
                                                : zero;
    }
  } else if (residual) {  // NCHW: pixels fastest
    for (int idx = tid; idx < OS * OS * KB; idx += DW_NT) {
      const int p = idx % (OS * OS), k = idx / (OS * OS);
      const int oh = o0 + p / OS, ow = p0 + p % OS;
      dxss[p * KB + k] = (c0 + k < C && oh < Ho && ow < Wo)
                             ? ld(dxb + (c0 + k) * HW + S * oh * W + S * ow)
                             : zero;
    }
  }
  __syncthreads();

  // ---- b1 and db1 = act'(b1_pre) * (wc^T * db) on the 1-ring (zero outside the output) ---
  {
    A wb[9], wc[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      wb[k] = ws[(9 + k) * KB + kc];
      wc[k] = ws[(18 + k) * KB + kc];
    }
    const A bb = ws[27 * KB + kc];
    for (int p = grp; p < ON * ON; p += NG) {
      const int lr = p / ON, lc = p % ON;
      const int oh = o0 - 1 + lr, ow = p0 - 1 + lc;
      A bv = A(0), g1 = A(0);
      if (oh >= 0 && oh < Ho && ow >= 0 && ow < Wo) {
        A pre = bb, g = A(0);
#pragma unroll
        for (int i = 0; i < 3; ++i)
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            pre += wb[i * 3 + j] * to_acc(xs[((S * lr + i) * XR + S * lc + j) * KB + kc]);
            g += wc[i * 3 + j] * to_acc(dbs[((lr + 2 - i) * OB + lc + 2 - j) * KB + kc]);
          }
        bv = act_apply(act, pre);
        g1 = act_grad(act, g, pre);
      }
      b1s[p * KB + kc] = bv;
      db1s[p * KB + kc] = g1;
    }
  }
  __syncthreads();

  // ---- weight/bias partials over the owned outputs, a fixed pixel sequence per thread ----
  A acc[BWD_NDW];
#pragma unroll
  for (int v = 0; v < BWD_NDW; ++v) acc[v] = A(0);
  for (int p = grp; p < OS * OS; p += NG) {
    const int lo_r = p / OS, lo_c = p % OS;
    if (o0 + lo_r >= Ho || p0 + lo_c >= Wo) continue;  // x may be non-zero (even NaN) there
    const int q = (lo_r + 1) * ON + lo_c + 1;
    const A gA = to_acc(das[q * KB + kc]), g1 = db1s[q * KB + kc];
    const A gB = to_acc(dbs[((lo_r + 2) * OB + lo_c + 2) * KB + kc]);
    acc[9] += gA;
    acc[19] += g1;
    acc[29] += gB;
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        const A xv = to_acc(xs[((S * (lo_r + 1) + i) * XR + S * (lo_c + 1) + j) * KB + kc]);
        acc[i * 3 + j] += gA * xv;
        acc[10 + i * 3 + j] += g1 * xv;
        acc[20 + i * 3 + j] += gB * b1s[((lo_r + i) * ON + lo_c + j) * KB + kc];
      }
  }
  __syncthreads();  // x, db, b1 are dead: red reuses them

#pragma unroll
  for (int v = 0; v < BWD_NDW; ++v) red[(grp * BWD_NDW + v) * KB + kc] = acc[v];

  // ---- dx: transposed stride-S depthwise of da (wa) and db1 (wb), plus the shortcut -------
  {
    A wa[9], wb[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      wa[k] = ws[k * KB + kc];
      wb[k] = ws[(9 + k) * KB + kc];
    }
    // NG is a multiple of DT: a thread keeps one column and walks rows, so with NG == DT the
    // row parities (the stride-2 taps) are known at compile time in the unrolled loop. At
    // stride 2 the two half-warps (groups 2w, 2w+1) take columns of one parity (no divergence)
    // two apart (adjacent 1-ring positions: no bank conflicts): 0 2 1 3 4 6 5 7 ...
    static_assert(NG % DT == 0 && DT % 4 == 0, "a thread keeps its column");
    const int gc = grp % DT;
    const int wr = S == 1 ? gc : (gc >> 2) * 4 + ((gc >> 1) & 1) + 2 * (gc & 1);
    const int hr0 = NG == DT ? 0 : grp / DT;
#pragma unroll 2
    for (int hr = hr0; hr < DT; hr += NG / DT) {
      const int p = hr * DT + wr;
      A v = A(0);
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        const int nl = hr + 1 - i;  // s * (output row) - R0, in [-1, DT]
        if (S == 2 && (nl & 1)) continue;
        const int lr = (nl + S) / S;  // its 1-ring row
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          const int ml = wr + 1 - j;
          if (S == 2 && (ml & 1)) continue;
          const int q = (lr * ON + (ml + S) / S) * KB + kc;
          v += wa[i * 3 + j] * to_acc(das[q]) + wb[i * 3 + j] * db1s[q];
        }
      }
      if (residual && hr % S == 0 && wr % S == 0)
        v += to_acc(dxss[((hr / S) * OS + wr / S) * KB + kc]);
      const int h = R0 + hr, w = Q0 + wr;
      if (cl) {
        if (c < C && h < H && w < W) stg(dxb + (h * W + w) * C + c, from_acc<T>(v));
      } else {
        stage[kc * SLD + p] = from_acc<T>(v);
      }
    }
  }
  __syncthreads();

  // ---- the tile's partials: groups summed in order; v fastest, so the stores are contiguous
  for (int idx = tid; idx < KB * BWD_NDW; idx += DW_NT) {
    const int k = idx / BWD_NDW, v = idx % BWD_NDW;
    if (c0 + k >= C) continue;
    A s = A(0);
    for (int g = 0; g < NG; ++g) s += red[(g * BWD_NDW + v) * KB + k];
    stg(dw_part + (int64_t(part) * C + c0 + k) * BWD_NDW + v, s);
  }
  if (!cl) {
    for (int idx = tid; idx < KB * DT * DT; idx += DW_NT) {
      const int p = idx % (DT * DT), k = idx / (DT * DT);
      const int h = R0 + p / DT, w = Q0 + p % DT;
      if (c0 + k < C && h < H && w < W) stg(dxb + (c0 + k) * HW + h * W + w, stage[k * SLD + p]);
    }
  }
}

template <typename T, int S>
const char* launch_dw_stride(const BlockDesc& d, const BlockTensors<T>& t, const T* da,
                             const T* db, T* dx, bwd_acc_t<T>* dw_part, int64_t tiles_w,
                             int64_t tiles_hw, unsigned gx, unsigned gy, cudaStream_t stream) {
  const DwMap m = dw_map<T, S>(d.residual, !d.channels_last);
  auto kernel = dw_backward_kernel<T, S>;
  static std::atomic<int> raised[64] = {};
  if (const char* err = allow_dynamic_smem(kernel, m.total, raised)) return err;
  const cudaError_t e =
      MSF_LAUNCH_PDL(pdl_enabled(), kernel, dim3(gx * gy), DW_NT, m.total, stream, d, t, da, db,
                     dx, dw_part, m, static_cast<int>(tiles_w), static_cast<int>(tiles_hw),
                     static_cast<int>(gy));
  return e != cudaSuccess ? cudaGetErrorString(e) : nullptr;
}

}  // namespace

int64_t backward_dw_parts(const BlockDesc& d) {
  return d.B * ((d.H + DW_DT - 1) / DW_DT) * ((d.W + DW_DT - 1) / DW_DT);
}

namespace {
template <int S>
size_t dw_smem(bool residual, bool nchw, int esz) {
  if (esz == 2) return dw_map<__half, S>(residual, nchw).total;
  if (esz == 4) return dw_map<float, S>(residual, nchw).total;
  return dw_map<double, S>(residual, nchw).total;
}
}  // namespace

size_t backward_dw_smem(const BlockDesc& d, int esz) {
  return d.stride == 1 ? dw_smem<1>(d.residual, !d.channels_last, esz)
                       : dw_smem<2>(d.residual, !d.channels_last, esz);
}

template <typename T>
const char* launch_backward_dw(const BlockDesc& d, const BlockTensors<T>& t, const T* da,
                               const T* db, T* dx, bwd_acc_t<T>* dw_part,
                               cudaStream_t stream) {
  constexpr int KB = DwKB<T>::value;
  if (d.stride != 1 && d.stride != 2) return "backward_dw: stride must be 1 or 2";
  const int64_t lim = 0x7fffffffLL;
  const int64_t tiles_h = (d.H + DW_DT - 1) / DW_DT, tiles_w = (d.W + DW_DT - 1) / DW_DT;
  const int64_t parts = d.B * tiles_h * tiles_w, cblocks = (d.C + KB - 1) / KB;
  if (d.C * d.H * d.W > lim || parts * cblocks > lim)
    return "backward_dw: the input is too large for the CUDA kernel's 32-bit indexing or grid";
  if (parts == 0 || d.C == 0) return nullptr;
  const unsigned gx = static_cast<unsigned>(parts), gy = static_cast<unsigned>(cblocks);
  return d.stride == 1
             ? launch_dw_stride<T, 1>(d, t, da, db, dx, dw_part, tiles_w, tiles_h * tiles_w,
                                      gx, gy, stream)
             : launch_dw_stride<T, 2>(d, t, da, db, dx, dw_part, tiles_w, tiles_h * tiles_w,
                                      gx, gy, stream);
}

#define MSF_INSTANTIATE_DW(T)                                                                   \
  template const char* launch_backward_dw<T>(const BlockDesc&, const BlockTensors<T>&,          \
                                             const T*, const T*, T*, bwd_acc_t<T>*,              \
                                             cudaStream_t);
MSF_INSTANTIATE_DW(float)
MSF_INSTANTIATE_DW(double)
MSF_INSTANTIATE_DW(__half)
MSF_INSTANTIATE_DW(__nv_bfloat16)
#undef MSF_INSTANTIATE_DW

}  // namespace cuda
}  // namespace msfused
