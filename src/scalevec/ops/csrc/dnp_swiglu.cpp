// DNP SwiGLU on CPU: h = silu(γ ⊙ RMSNorm(gate)) ⊙ RMSNorm(up), norms over the last dimension, fp32 inside, with
// gate and up the two halves of one projection's output [gate | up] (its gradient is returned the same way, so
// the projection's backward reads it without a concatenation).
//
// The two branch norms make this a row-wise op: each output row needs its row's statistics first. The code
// torch.compile generates sweeps every row once per statistic and, backward, writes γ's per-token gradient out
// for a separate reduction, and on CPU these elementwise kernels are bound by memory traffic. Here each row is
// read from memory once in each direction: it is converted into fp32 buffers that stay in L1, the statistics
// come from those, and γ's gradient is accumulated in fp32 per fixed block of rows, the blocks summed in order
// (so the result does not depend on the thread count). Memory traffic is then plain SwiGLU's: read gate and up,
// write h; read gate, up and dh, write their gradients.
//
// Operators (schemas below) are registered with the dispatcher; `scalevec/ops/dnp_swiglu.py` builds this file,
// adds their fake (shape) functions and autograd, and falls back to the PyTorch formulation where it cannot.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kBlockRows = 64;  // rows per partial sum of γ's gradient

// A run of a row's elements as fp32 vectors: one vector for float rows, two for 16-bit rows (one load of T).
template <typename T>
struct Chunk {
  static constexpr int64_t kVecs = std::is_same_v<T, float> ? 1 : 2;
  static constexpr int64_t kSize = kVecs * fVec::size();
  fVec v[kVecs];

  // Loads elements [j, j + kSize) of a row of width n; past n the chunk holds zeros.
  C10_ALWAYS_INLINE static Chunk load(const T* row, int64_t j, int64_t n) {
    T padded[kSize];
    const T* p = row + j;
    if (j + kSize > n) {
      std::fill(padded, padded + kSize, T(0));
      std::copy(row + j, row + n, padded);
      p = padded;
    }
    Chunk c;
    if constexpr (kVecs == 1) {
      c.v[0] = fVec::loadu(p);
    } else {
      std::tie(c.v[0], c.v[1]) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    }
    return c;
  }

  C10_ALWAYS_INLINE void store(T* row, int64_t j, int64_t n) const {
    T out[kSize];
    T* p = j + kSize > n ? out : row + j;
    if constexpr (kVecs == 1) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<T>(v[0], v[1]).store(p);
    }
    if (p == out) std::copy(out, out + (n - j), row + j);
  }
};

C10_ALWAYS_INLINE fVec sigmoid(const fVec& a) { return fVec(1.f) / (fVec(1.f) + a.neg().exp_u20()); }

inline float reduce_sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

inline float rstd_of(const fVec& sum_squares, int64_t n, float eps) {
  return 1.f / std::sqrt(reduce_sum(sum_squares) / static_cast<float>(n) + eps);
}

// A 2-D view of rows with a contiguous last dimension.
struct Rows {
  int64_t count, width, stride;
  explicit Rows(const at::Tensor& t) : count(t.size(0)), width(t.size(1)), stride(t.stride(0)) {}
};

at::Tensor as_rows(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

// Row width rounded up to whole chunks: the fp32 row buffers and γ are padded with zeros to it.
template <typename T>
int64_t padded(int64_t n) {
  return (n + Chunk<T>::kSize - 1) / Chunk<T>::kSize * Chunk<T>::kSize;
}

template <typename T>
void forward_rows(const at::Tensor& gate_up, const float* gain, float eps, T* out, float* rstd) {
  const Rows r(gate_up);
  const int64_t n = r.width / 2;
  const T* base = gate_up.const_data_ptr<T>();
  at::parallel_for(0, r.count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T *grow = base + i * r.stride, *urow = grow + n;
      // One accumulator per vector of a chunk, so the pass does not wait on one chain of dependent fmadds.
      fVec sg[Chunk<T>::kVecs], su[Chunk<T>::kVecs];
      for (int64_t k = 0; k < Chunk<T>::kVecs; ++k) sg[k] = su[k] = fVec(0.f);
      for (int64_t j = 0; j < n; j += Chunk<T>::kSize) {
        const auto gc = Chunk<T>::load(grow, j, n), uc = Chunk<T>::load(urow, j, n);
        for (int64_t k = 0; k < Chunk<T>::kVecs; ++k) {
          sg[k] = at::vec::fmadd(gc.v[k], gc.v[k], sg[k]);
          su[k] = at::vec::fmadd(uc.v[k], uc.v[k], su[k]);
        }
      }
      for (int64_t k = 1; k < Chunk<T>::kVecs; ++k) sg[0] = sg[0] + sg[k], su[0] = su[0] + su[k];
      const float rg = rstd_of(sg[0], n, eps), ru = rstd_of(su[0], n, eps);
      rstd[2 * i] = rg;
      rstd[2 * i + 1] = ru;
      for (int64_t j = 0; j < n; j += Chunk<T>::kSize) {
        // The row is read again from cache (it was just loaded): cheaper than keeping an fp32 copy.
        const auto gc = Chunk<T>::load(grow, j, n), uc = Chunk<T>::load(urow, j, n);
        Chunk<T> h;
        for (int64_t k = 0; k < Chunk<T>::kVecs; ++k) {
          const auto a = gc.v[k] * fVec(rg) * fVec::loadu(gain + j + k * fVec::size());
          h.v[k] = a * sigmoid(a) * (uc.v[k] * fVec(ru));
        }
        h.store(out + i * n, j, n);
      }
    }
  });
}

// What one backward call reads and writes.
template <typename T>
struct Backward {
  const T *base, *dh;
  int64_t stride, dh_stride, n, np;
  const float *gain, *rstd;
  T* dgate_up;
};

// One row's backward, adding γ's gradient for it to acc. buf holds the row's fp32 gradients at x̂ (gate's, then
// up's) between the two passes; it stays in L1.
//
// Kept out of line: inlined into the row loop it ran slower (docs/performance.md). The row helpers it calls are
// forced inline: GCC declined to inline Chunk::load here, and the calls spilled every vector register.
template <typename T>
C10_NOINLINE void backward_row(const Backward<T>& a, int64_t i, float* acc, float* buf) {
  constexpr int64_t kVecs = Chunk<T>::kVecs;
  const int64_t n = a.n;
  const T* grow = a.base + i * a.stride;
  const T* dhrow = a.dh + i * a.dh_stride;
  const float* gain = a.gain;
  const float rg = a.rstd[2 * i], ru = a.rstd[2 * i + 1];
  float *dxg = buf, *dxu = buf + a.np;
  // Pass 1: the gradients at x̂ (dx̂_gate = γ ⊙ da, dx̂_up = dh ⊙ silu(a)), kept in fp32 for pass 2, the row sums
  // Σ dx̂ ⊙ x̂ the norms' backward needs, and γ's gradient da ⊙ x̂_gate.
  fVec s_gate(0.f), s_up(0.f);
  for (int64_t j = 0; j < n; j += Chunk<T>::kSize) {
    const auto gc = Chunk<T>::load(grow, j, n), uc = Chunk<T>::load(grow + n, j, n),
               dc = Chunk<T>::load(dhrow, j, n);
    for (int64_t k = 0; k < kVecs; ++k) {
      const int64_t o = j + k * fVec::size();
      const auto xhg = gc.v[k] * fVec(rg), xhu = uc.v[k] * fVec(ru), gam = fVec::loadu(gain + o);
      const auto av = xhg * gam, s = sigmoid(av), silu = av * s;
      const auto da = dc.v[k] * xhu * (s + silu * (fVec(1.f) - s));  // silu'(a) = s + a·s·(1 - s)
      const auto gu = dc.v[k] * silu;
      at::vec::fmadd(da, xhg, fVec::loadu(acc + o)).store(acc + o);
      s_gate = at::vec::fmadd(da, av, s_gate);
      s_up = at::vec::fmadd(gu, xhu, s_up);
      (da * gam).store(dxg + o);
      gu.store(dxu + o);
    }
  }
  // Pass 2: RMSNorm backward, dx = r · (dx̂ − x̂ · mean(dx̂ ⊙ x̂)) = r·dx̂ − r²·mean(dx̂ ⊙ x̂)·x, with x
  // reloaded from the row (still in L1) instead of x̂ kept in fp32: two stores fewer per element.
  const float mg = reduce_sum(s_gate) / static_cast<float>(n), mu = reduce_sum(s_up) / static_cast<float>(n);
  const fVec rgv(rg), ruv(ru), cg2(rg * rg * mg), cu2(ru * ru * mu);
  T* dgrow = a.dgate_up + i * 2 * n;
  for (int64_t j = 0; j < n; j += Chunk<T>::kSize) {
    const auto gc = Chunk<T>::load(grow, j, n), uc = Chunk<T>::load(grow + n, j, n);
    Chunk<T> cg, cu;
    for (int64_t k = 0; k < kVecs; ++k) {
      const int64_t o = j + k * fVec::size();
      cg.v[k] = at::vec::fnmadd(gc.v[k], cg2, rgv * fVec::loadu(dxg + o));
      cu.v[k] = at::vec::fnmadd(uc.v[k], cu2, ruv * fVec::loadu(dxu + o));
    }
    cg.store(dgrow, j, n);
    cu.store(dgrow + n, j, n);
  }
}

template <typename T>
void backward_rows(const at::Tensor& dh, const at::Tensor& gate_up, const float* gain, const float* rstd,
                   T* dgate_up, float* dgain) {
  const Rows r(gate_up), d(dh);
  const int64_t n = d.width, np = padded<T>(n), blocks = (r.count + kBlockRows - 1) / kBlockRows;
  const Backward<T> a{gate_up.const_data_ptr<T>(), dh.const_data_ptr<T>(), r.stride, d.stride, n, np, gain, rstd,
                      dgate_up};
  std::vector<float> partial(blocks * np);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(2 * np);
    for (int64_t b = b0; b < b1; ++b) {
      float* acc = partial.data() + b * np;
      std::fill(acc, acc + np, 0.f);
      for (int64_t i = b * kBlockRows; i < std::min(r.count, (b + 1) * kBlockRows); ++i) {
        backward_row(a, i, acc, buf.data());
      }
    }
  });
  // The blocks' partial sums, in block order.
  std::fill(dgain, dgain + n, 0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* p = partial.data() + b * np;
    for (int64_t j = 0; j < n; ++j) dgain[j] += p[j];
  }
}

template <typename F>
void dispatch(at::ScalarType t, F f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "scalevec::dnp_swiglu: no CPU kernel for ", t);
  }
}

// γ as fp32, padded with zeros to whole chunks.
template <typename T>
std::vector<float> padded_gain(const at::Tensor& gain) {
  const auto g = gain.to(at::kFloat).contiguous();
  std::vector<float> out(padded<T>(g.numel()), 0.f);
  std::copy(g.const_data_ptr<float>(), g.const_data_ptr<float>() + g.numel(), out.begin());
  return out;
}

int64_t branch_width(const at::Tensor& gate_up, const at::Tensor& gain) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "scalevec::dnp_swiglu: gate_up must hold [gate | up] along its last dimension");
  const int64_t n = gate_up.size(-1) / 2;
  TORCH_CHECK(gain.dim() == 1 && gain.size(0) == n, "scalevec::dnp_swiglu: gain must be a vector of the branch width");
  return n;
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

std::tuple<at::Tensor, at::Tensor> dnp_swiglu(const at::Tensor& gate_up, const at::Tensor& gain, double eps) {
  const int64_t n = branch_width(gate_up, gain);
  const auto rows = as_rows(gate_up);
  auto out = at::empty(with_last(gate_up, n), gate_up.options());
  auto rstd = at::empty({rows.size(0), 2}, gate_up.options().dtype(at::kFloat));
  dispatch(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto gn = padded_gain<T>(gain);
    forward_rows<T>(rows, gn.data(), static_cast<float>(eps), out.mutable_data_ptr<T>(),
                    rstd.mutable_data_ptr<float>());
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> dnp_swiglu_backward(const at::Tensor& dh, const at::Tensor& gate_up,
                                                       const at::Tensor& gain, const at::Tensor& rstd) {
  const int64_t n = branch_width(gate_up, gain);
  TORCH_CHECK(dh.sizes() == at::IntArrayRef(with_last(gate_up, n)),
              "scalevec::dnp_swiglu_backward: dh must have the output's shape");
  const auto rows = as_rows(gate_up), d = as_rows(dh.to(gate_up.scalar_type()));
  const auto r = rstd.to(at::kFloat).contiguous();
  TORCH_CHECK(r.numel() == 2 * rows.size(0), "scalevec::dnp_swiglu_backward: rstd must hold two values per row");
  auto dgate_up = at::empty(gate_up.sizes(), gate_up.options());
  auto dgain = at::empty({n}, gain.options().dtype(at::kFloat));
  dispatch(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto gn = padded_gain<T>(gain);
    backward_rows<T>(d, rows, gn.data(), r.const_data_ptr<float>(), dgate_up.mutable_data_ptr<T>(),
                     dgain.mutable_data_ptr<float>());
  });
  return {dgate_up, dgain.to(gain.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(scalevec, m) {
  // gate_up: [gate | up] along the last dimension; returns h and the per-row 1/RMS of gate and up.
  m.def("dnp_swiglu(Tensor gate_up, Tensor gain, float eps) -> (Tensor, Tensor)");
  // Returns the gradients at gate_up ([dgate | dup]) and gain.
  m.def("dnp_swiglu_backward(Tensor dh, Tensor gate_up, Tensor gain, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalevec, CPU, m) {
  m.impl("dnp_swiglu", &dnp_swiglu);
  m.impl("dnp_swiglu_backward", &dnp_swiglu_backward);
}
