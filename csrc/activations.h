// The block's activations, for every C++ and CUDA kernel: one row each in the X-macro
// below plus one ActOp specialisation. The X-macro generates the enum (the integer codes of
// the operator schemas' `act` argument), the range check and its message, the dispatch onto
// a compile-time code, and the table tests compare with msfused/activations.py.
//
// No PyTorch headers: the CPU kernels, the .cu files and tools/cuda_emu include this.
#pragma once
#include <math.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define MSF_HD __host__ __device__ __forceinline__
#else
#define MSF_HD inline
#endif

namespace msfused {

// What the fused backward reads to differentiate the block's final activation.
enum ActSaves : int { kSavesNothing = 0, kSavesOutput = 1, kSavesPreact = 2 };

// X(Enum, "name", code, saves): code = the index in msfused/activations.py's table.
#define MSFUSED_ACTIVATIONS(X)          \
  X(None, "none", 0, kSavesNothing)     \
  X(Relu, "relu", 1, kSavesOutput)      \
  X(Relu6, "relu6", 2, kSavesOutput)    \
  X(Silu, "silu", 3, kSavesPreact)

enum Act : int {
#define MSF_ACT_ENUM(E, name, code, saves) kAct##E = code,
  MSFUSED_ACTIVATIONS(MSF_ACT_ENUM)
#undef MSF_ACT_ENUM
};

// "0 none, 1 relu, ..." for error messages.
#define MSF_ACT_DESC(E, name, code, saves) #code " " name ", "
constexpr const char kActivationList[] = MSFUSED_ACTIVATIONS(MSF_ACT_DESC);
#undef MSF_ACT_DESC

inline bool act_valid(int64_t act) {
  switch (act) {
#define MSF_ACT_CASE(E, name, code, saves) case code:
    MSFUSED_ACTIVATIONS(MSF_ACT_CASE)
#undef MSF_ACT_CASE
    return true;
    default:
      return false;
  }
}

constexpr ActSaves act_saves(int act) {
  switch (act) {
#define MSF_ACT_CASE(E, name, code, saves) case code: return saves;
    MSFUSED_ACTIVATIONS(MSF_ACT_CASE)
#undef MSF_ACT_CASE
    default:
      return kSavesNothing;
  }
}

inline const char* act_name(int act) {
  switch (act) {
#define MSF_ACT_CASE(E, name, code, saves) case code: return name;
    MSFUSED_ACTIVATIONS(MSF_ACT_CASE)
#undef MSF_ACT_CASE
    default:
      return "?";
  }
}

namespace act_detail {
MSF_HD float exp_(float v) { return expf(v); }
MSF_HD double exp_(double v) { return exp(v); }
}  // namespace act_detail

// ActOp<code>: fwd(v) = act(v), as torch.nn.functional computes it (NaN propagates: every
// comparison with NaN is false); grad(g, v) = g * act'(v), where v is the pre-activation or,
// for kSavesOutput activations, equally the output (relu: y > 0 <=> z > 0; relu6:
// 0 < y < 6 <=> 0 < z < 6). The gradients are PyTorch's select forms (threshold_backward,
// hardtanh_backward): 0 where the unit is off, including relu's 0 and relu6's 0 and 6, g
// elsewhere (also where v is NaN, and 0 where off even when g is NaN or inf).
// kVector: fwd and grad compile for GCC vector types too (the CPU kernels' SIMD rows);
// otherwise the CPU kernels apply them lane by lane.
template <int A>
struct ActOp;

template <>
struct ActOp<kActNone> {
  static constexpr bool kVector = true;
  template <typename T> MSF_HD static T fwd(T v) { return v; }
  template <typename T> MSF_HD static T grad(T g, T) { return g; }
};

template <>
struct ActOp<kActRelu> {
  static constexpr bool kVector = true;
  template <typename T> MSF_HD static T fwd(T v) {
    const T z{};
    return v < z ? z : v;
  }
  template <typename T> MSF_HD static T grad(T g, T v) {
    const T z{};
    return v <= z ? z : g;  // threshold_backward
  }
};

template <>
struct ActOp<kActRelu6> {
  static constexpr bool kVector = true;
  template <typename T> MSF_HD static T fwd(T v) {
    const T z{};
    const T six = z + 6;
    return v < z ? z : (v > six ? six : v);
  }
  template <typename T> MSF_HD static T grad(T g, T v) {
    const T z{};
    const T six = z + 6;
    return (v <= z) | (v >= six) ? z : g;  // hardtanh_backward
  }
};

template <>
struct ActOp<kActSilu> {
  static constexpr bool kVector = false;
  template <typename T> MSF_HD static T fwd(T v) { return v / (T(1) + act_detail::exp_(-v)); }
  template <typename T> MSF_HD static T grad(T g, T v) {
    const T s = T(1) / (T(1) + act_detail::exp_(-v));
    return g * (s * (T(1) + v * (T(1) - s)));
  }
};

// f(std::integral_constant<int, code>{}) for the run-time code `act` (checked beforehand
// with act_valid): the kernels get the activation as a template argument.
template <typename F>
decltype(auto) dispatch_act(int act, F&& f) {
  switch (act) {
#define MSF_ACT_CASE(E, name, code, saves) \
  case code: return f(std::integral_constant<int, code>{});
    MSFUSED_ACTIVATIONS(MSF_ACT_CASE)
#undef MSF_ACT_CASE
    default:
      return f(std::integral_constant<int, kActNone>{});  // unreachable after act_valid
  }
}

// Run-time forms for kernels that take the code as an argument (the CUDA kernels).
template <typename T>
MSF_HD T act_apply(int act, T v) {
  switch (act) {
#define MSF_ACT_CASE(E, name, code, saves) case code: return ActOp<code>::fwd(v);
    MSFUSED_ACTIVATIONS(MSF_ACT_CASE)
#undef MSF_ACT_CASE
    default:
      return v;
  }
}

template <typename T>
MSF_HD T act_grad(int act, T g, T v) {
  switch (act) {
#define MSF_ACT_CASE(E, name, code, saves) case code: return ActOp<code>::grad(g, v);
    MSFUSED_ACTIVATIONS(MSF_ACT_CASE)
#undef MSF_ACT_CASE
    default:
      return g;
  }
}

}  // namespace msfused
