// Whole-layer recurrent kernels for the CPU: one call runs one direction of one layer over all
// T steps, forward or backward, for the Elman RNN (tanh, relu), the LSTM and the GRU.
//
// Tensors are time-major and contiguous: x (T, B, I), per-step rows (B, G*H). Gate order and
// equations are torch.nn's (see torch_impl/lstm.py, gru.py, rnn.py):
//
//   xw_t = W_ih x_t + b_ih                      all t in one GEMM, before the loop
//   RNN:   h_t = act(xw_t + W_hh h_{t-1} + b_hh)
//   LSTM:  [i f g o] = [σ σ tanh σ](xw_t + W_hh h_{t-1} + b_hh)
//          c_t = f ⊙ c_{t-1} + i ⊙ g,   h_t = o ⊙ tanh(c_t)
//   GRU:   hh = W_hh h_{t-1} + b_hh,  r = σ(xw_r + hh_r),  z = σ(xw_z + hh_z)
//          n = tanh(xw_n + r ⊙ hh_n),  h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
//
// Padding: row b is active at step t when t < lengths[b]; an inactive row carries its state
// (h_t = h_{t-1}, c_t = c_{t-1}) and, in the backward, gets zero gate gradients and passes
// dh, dc straight through. The reverse direction runs t = T-1 .. 0 and so starts at each row's
// own last step from h0.
//
// States live in (T+1, B, H) buffers in the order the steps run, h0 first: forward
// hs[t] = h_{t-1}, hs[t+1] = h_t; reverse hs[t+1] = h_{t+1}, hs[t] = h_t.
//
// Per step: one GEMM of the B rows with W_hh (BLAS, into a preallocated row, no allocation in
// the loop), then one vectorized pass (at::vec::Vectorized) over the gates that writes the
// activated gates (saved for the backward), the new state and, in the backward, dgates and the
// carried dh; rows are split over threads when a step has enough of them. The weight gradients
// are the caller's: dW_ih = Σ_t dgates_x_tᵀ x_t and dW_hh = Σ_t dgates_h_tᵀ h_{t-1} are one
// GEMM each over all T B rows after the loop.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using at::vec::Vectorized;

enum Cell : int64_t { RNN_TANH = 0, RNN_RELU = 1, LSTM = 2, GRU = 3 };

int64_t num_gates(int64_t cell) { return cell == LSTM ? 4 : cell == GRU ? 3 : 1; }

// ------------------------------------------------------------------------------ matrix product

#ifdef SEQTWIN_MKL
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
}

void blas_gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a,
               int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

void blas_gemm(const char* ta, const char* tb, int m, int n, int k, double alpha,
               const double* a, int lda, const double* b, int ldb, double beta, double* c,
               int ldc) {
  dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
#endif

// C (M, N) = beta C + A (M, K) Wᵀ with W (N, K)  (w_is_nk), or A W with W (K, N); all
// row-major, A and C with row strides lda, ldc. beta = 0 never reads C.
template <typename T>
void gemm_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W,
               bool w_is_nk, T beta, T* C, int64_t ldc) {
#ifdef SEQTWIN_MKL
  // column-major BLAS sees the row-major C as Cᵀ (N, M) = op(W)ᵀ Aᵀ
  blas_gemm(w_is_nk ? "T" : "N", "N", static_cast<int>(N), static_cast<int>(M),
            static_cast<int>(K), T(1), W, static_cast<int>(w_is_nk ? K : N), A,
            static_cast<int>(lda), beta, C, static_cast<int>(ldc));
#else
  auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  Tensor w = w_is_nk ? at::from_blob(const_cast<T*>(W), {N, K}, options).t()
                     : at::from_blob(const_cast<T*>(W), {K, N}, options);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  c.addmm_(a, w, beta, 1);
#endif
}


// oneDNN's matmul with a weight reordered once into its blocked layout (ATen's
// mkldnn::_reorder_linear_weight / _linear_pointwise, what torch.nn's float32 CPU layers use).
// MKL's GEMM runs its AVX2 code on AMD CPUs and oneDNN its AVX-512 code, so oneDNN is up to 2x
// faster on a step's product once the product hides its call (~20 us more than the BLAS);
// the T products of a loop share one reorder. onednn_pays encodes the crossover measured over
// whole loops (T 64, 2-core Zen 4, 2 threads; M rows, W (N, K); the forward has N = G*H >= K = H,
// the backward N = H < K = G*H):
//   forward   LSTM H 256 B 8: BLAS 7.2 ms, oneDNN 6.2;  H 512 B 1: 9.2 vs 6.7;  H 512 B 8: 29 vs 13
//             LSTM H 128 B 64: 7.5 vs 8.6;  GRU H 512 B 1: 6.9 vs 5.1;  RNN H 512 B 1: 1.7 vs 2.5
//   backward  LSTM H 256 B 8: 4.4 vs 5.4;  H 256 B 32: 10.1 vs 8.9;  H 512 B 8: 18.8 vs 9.1
//             GRU H 512 B 1: 4.9 vs 5.8;  RNN H 512 B 8: 4.9 vs 4.5
//   any cell at H 64: BLAS 2-30x faster
enum class StepGemm : int64_t { AUTO = 0, BLAS = 1, ONEDNN = 2 };
StepGemm step_gemm = StepGemm::AUTO;
std::atomic<int64_t> packings{0};  // weights reordered so far (tests check the path is taken)

bool onednn_pays(int64_t M, int64_t N, int64_t K, int64_t uses) {
  if (step_gemm != StepGemm::AUTO) {
    return step_gemm == StepGemm::ONEDNN && uses > 1;
  }
  if (uses < 4) {  // the reorder is one more pass over W
    return false;
  }
  const double work = static_cast<double>(M) * N * K;
  if (N >= K) {  // forward: K = H
    return K >= 256 && work >= 0.75e6;
  }
  return (N >= 512 && work >= 1e6) || (N >= 256 && work >= 8e6);  // backward: N = H
}

// The input projection x W_ihᵀ (+ b) of all T steps, one product (M T*B rows, W (N, K)): oneDNN
// from M*N*K of 16e6, or 8e6 at K >= 512, on (TB 64, K 256, N 1024: MKL 230 us, oneDNN 190;
// TB 8, K 512, N 2048: 267 vs 188; TB 2048, K 512, N 2048: 7.7 vs 5.4 ms), the BLAS below
// (TB 8, K 64, N 256: 13 vs 35 us; TB 512, K 64, N 256: 109 vs 134).
bool onednn_projection_pays(int64_t M, int64_t N, int64_t K) {
  return static_cast<double>(M) * N * K * (K >= 512 ? 2 : 1) >= 16e6;
}

using LinearFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                        c10::string_view, c10::List<std::optional<c10::Scalar>>,
                        std::optional<c10::string_view>);
using ReorderFn = Tensor(const Tensor&, std::optional<int64_t>);

struct OneDNN {
  c10::TypedOperatorHandle<LinearFn> linear;
  c10::TypedOperatorHandle<ReorderFn> reorder;
};

// The two ATen ops, or null where this torch has no oneDNN (looked up once).
const OneDNN* onednn() {
  static const std::unique_ptr<OneDNN> ops = []() -> std::unique_ptr<OneDNN> {
    try {
      auto& dispatcher = c10::Dispatcher::singleton();
      auto linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
      auto reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
      if (!linear.has_value() || !reorder.has_value() ||
          !linear->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
        return nullptr;
      }
      return std::make_unique<OneDNN>(
          OneDNN{linear->typed<LinearFn>(), reorder->typed<ReorderFn>()});
    } catch (const std::exception&) {  // a schema of another shape: use the BLAS
      return nullptr;
    }
  }();
  return ops.get();
}

// W of a loop's T products a (M, K) -> beta C + a op(W): oneDNN's packed matmul where that
// pays (float32), else the BLAS GEMM of gemm_rows.
template <typename T>
struct StepWeight {
  const T* w;
  bool w_is_nk;
  int64_t N, K;
  Tensor packed;  // oneDNN's reordered W (N, K), or undefined
  c10::List<std::optional<c10::Scalar>> no_scalars;

  StepWeight(const T* w_, bool nk, int64_t M, int64_t N_, int64_t K_, int64_t uses)
      : w(w_), w_is_nk(nk), N(N_), K(K_) {
    const OneDNN* ops = std::is_same<T, float>::value ? onednn() : nullptr;
    if (ops != nullptr && onednn_pays(M, N, K, uses)) {
      auto options = at::TensorOptions().dtype(at::kFloat);
      // oneDNN takes W as (N, K); the backward's W (K, N) is given to it as a copy of Wᵀ
      Tensor weight = nk ? at::from_blob(const_cast<T*>(w), {N, K}, options)
                         : at::from_blob(const_cast<T*>(w), {K, N}, options).t().contiguous();
      packed = ops->reorder.call(weight, M);
      packings.fetch_add(1);
    }
  }

  // C (M, N) = beta C + A op(W); A and C rows with strides lda, ldc
  void apply(int64_t M, const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    if (packed.defined()) {
      auto options = at::TensorOptions().dtype(at::kFloat);
      Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
      Tensor product = onednn()->linear.call(a, packed, std::nullopt, "none", no_scalars,
                                             std::nullopt);
      Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
      if (beta == T(0)) {
        c.copy_(product);
      } else {
        c.add_(product);
      }
      return;
    }
    gemm_rows<T>(M, N, K, A, lda, w, w_is_nk, beta, C, ldc);
  }
};

// ------------------------------------------------------------------------------ pointwise

// The gates' activations. float32 takes ATen's exp_u20 (a polynomial exp, within 20 ulp) and
// tanh(x) = 2 σ(2x) - 1: the LSTM's gate pass runs 2.5x faster than on Sleef's exp and tanh
// (B 32, H 512, one thread: 98 -> 38 us a step; B 8, H 64: 3.2 -> 1.3 us), and the error
// (σ within 2e-6 relative, tanh within 1e-6 absolute) stays well inside the float32 budget
// (1e-5 relative to the norm). float64 keeps Sleef's 1-ulp functions.
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& a) {
  const Vectorized<T> one(T(1));
  if constexpr (std::is_same<T, float>::value) {
    return one / (one + a.neg().exp_u20());
  } else {
    return one / (one + a.neg().exp());
  }
}

template <typename T>
inline Vectorized<T> fast_tanh(const Vectorized<T>& a) {
  if constexpr (std::is_same<T, float>::value) {
    const Vectorized<T> two(T(2));
    return at::vec::fmsub(two, sigmoid(two * a), Vectorized<T>(T(1)));
  } else {
    return a.tanh();
  }
}

inline bool active(const int64_t* lengths, int64_t b, int64_t t) {
  return lengths == nullptr || t < lengths[b];
}

// Rows [b0, b1) of a step, split over threads when the step has enough elements to pay.
template <typename F>
void for_rows(int64_t B, int64_t row_size, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_size, 1));
  if (B <= grain) {
    f(0, B);
  } else {
    at::parallel_for(0, B, grain, f);
  }
}

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t H) {
  std::memcpy(dst, src, sizeof(T) * H);
}

template <typename T>
inline void zero_row(T* dst, int64_t n) {
  std::memset(dst, 0, sizeof(T) * n);
}

// Where step t reads its state and writes the new one in the (T+1, B, H) buffers.
struct Slots {
  int64_t prev, next;
};
inline Slots slots(int64_t t, bool reverse) {
  return reverse ? Slots{t + 1, t} : Slots{t, t + 1};
}

// ------------------------------------------------------------------------------ forward steps

// RNN: a = xw_t + W_hh h_{t-1} (+ biases, folded into xw) already in `a`; h_t = act(a).
template <typename T>
void rnn_rows(bool relu, const T* a, const T* h_prev, T* h, int64_t H, int64_t b0, int64_t b1,
              const int64_t* lengths, int64_t t) {
  using V = Vectorized<T>;
  for (int64_t b = b0; b < b1; ++b) {
    if (!active(lengths, b, t)) {
      copy_row(h + b * H, h_prev + b * H, H);
      continue;
    }
    const T* ab = a + b * H;
    T* hb = h + b * H;
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      V x = V::loadu(ab + j, n);
      (relu ? at::vec::clamp_min(x, V(T(0))) : fast_tanh(x)).store(hb + j, n);
    }
  }
}

// LSTM: the pre-activations a = [a_i a_f a_g a_o] (B, 4H) become the gates [i f g o] in place.
template <typename T>
void lstm_rows(T* a, const T* h_prev, const T* c_prev, T* h, T* c, int64_t H, int64_t b0,
               int64_t b1, const int64_t* lengths, int64_t t) {
  using V = Vectorized<T>;
  for (int64_t b = b0; b < b1; ++b) {
    if (!active(lengths, b, t)) {
      copy_row(h + b * H, h_prev + b * H, H);
      copy_row(c + b * H, c_prev + b * H, H);
      continue;
    }
    T* ab = a + b * 4 * H;
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      V i = sigmoid(V::loadu(ab + j, n));
      V f = sigmoid(V::loadu(ab + H + j, n));
      V g = fast_tanh(V::loadu(ab + 2 * H + j, n));
      V o = sigmoid(V::loadu(ab + 3 * H + j, n));
      V c_new = at::vec::fmadd(f, V::loadu(c_prev + b * H + j, n), i * g);
      (o * fast_tanh(c_new)).store(h + b * H + j, n);
      c_new.store(c + b * H + j, n);
      i.store(ab + j, n);
      f.store(ab + H + j, n);
      g.store(ab + 2 * H + j, n);
      o.store(ab + 3 * H + j, n);
    }
  }
}

// GRU: xw (B, 3H) = W_ih x_t + b_ih, hh (B, 3H) = W_hh h_{t-1} (no bias: b_hh is added here);
// saved (B, 4H) = [r z n hh_n], hh_n including b_hn.
template <typename T>
void gru_rows(const T* xw, const T* hh, const T* b_hh, const T* h_prev, T* h, T* saved,
              int64_t H, int64_t b0, int64_t b1, const int64_t* lengths, int64_t t) {
  using V = Vectorized<T>;
  for (int64_t b = b0; b < b1; ++b) {
    if (!active(lengths, b, t)) {
      copy_row(h + b * H, h_prev + b * H, H);
      zero_row(saved + b * 4 * H, 4 * H);  // never read; written so that every output is set
      continue;
    }
    const T* x = xw + b * 3 * H;
    const T* r_h = hh + b * 3 * H;
    T* s = saved + b * 4 * H;
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      V hr = V::loadu(r_h + j, n), hz = V::loadu(r_h + H + j, n);
      V hn = V::loadu(r_h + 2 * H + j, n);
      if (b_hh != nullptr) {
        hr = hr + V::loadu(b_hh + j, n);
        hz = hz + V::loadu(b_hh + H + j, n);
        hn = hn + V::loadu(b_hh + 2 * H + j, n);
      }
      V r = sigmoid(V::loadu(x + j, n) + hr);
      V z = sigmoid(V::loadu(x + H + j, n) + hz);
      V n_t = fast_tanh(at::vec::fmadd(r, hn, V::loadu(x + 2 * H + j, n)));
      V hp = V::loadu(h_prev + b * H + j, n);
      at::vec::fmadd(z, hp - n_t, n_t).store(h + b * H + j, n);  // (1 - z) n + z h_{t-1}
      r.store(s + j, n);
      z.store(s + H + j, n);
      n_t.store(s + 2 * H + j, n);
      hn.store(s + 3 * H + j, n);
    }
  }
}

// ------------------------------------------------------------------------------ backward steps
// Each takes dh_in (the gradient reaching h_t from step t+1 and from h_n) and the step's dout
// row (the gradient of the state row h_t itself; may be null), and writes dh_out: the part of
// dh_{t-1} that does not go through W_hh (0 at active rows, dh at inactive ones, which carried
// h_{t-1}); the caller then adds dgates_h W_hh to it. A layer whose output is h_t ⊙ [t <
// lengths] passes dout masked the same way.

template <typename T>
inline const T* dout_row(const T* dout, int64_t t, int64_t b, int64_t st, int64_t sb) {
  return dout == nullptr ? nullptr : dout + t * st + b * sb;
}

template <typename T, typename V = Vectorized<T>>
inline V load_dh(const T* dh_in, const T* dout, int64_t j, int64_t n) {
  V dh = V::loadu(dh_in + j, n);
  return dout == nullptr ? dh : dh + V::loadu(dout + j, n);
}

// dst = a + b (b may be null), H elements.
template <typename T>
inline void add_row(T* dst, const T* a, const T* b, int64_t H) {
  using V = Vectorized<T>;
  if (b == nullptr) {
    if (dst != a) {
      copy_row(dst, a, H);
    }
    return;
  }
  for (int64_t j = 0; j < H; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), H - j);
    (V::loadu(a + j, n) + V::loadu(b + j, n)).store(dst + j, n);
  }
}

template <typename T>
void rnn_backward_rows(bool relu, const T* h, const T* dh_in, const T* dout, int64_t st,
                       int64_t sb, T* dgates, T* dh_out, int64_t H, int64_t b0, int64_t b1,
                       const int64_t* lengths, int64_t t) {
  using V = Vectorized<T>;
  for (int64_t b = b0; b < b1; ++b) {
    const T* d_out = dout_row(dout, t, b, st, sb);
    if (!active(lengths, b, t)) {  // h_t = h_{t-1}: dh carried
      zero_row(dgates + b * H, H);
      add_row(dh_out + b * H, dh_in + b * H, d_out, H);
      continue;
    }
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      V dh = load_dh<T>(dh_in + b * H, d_out, j, n);
      V hv = V::loadu(h + b * H + j, n);
      V da = relu ? V::blendv(V(T(0)), dh, hv > V(T(0)))          // act'(a) = [h > 0]
                  : dh * (V(T(1)) - hv * hv);                       // act'(a) = 1 - h²
      da.store(dgates + b * H + j, n);
    }
    zero_row(dh_out + b * H, H);
  }
}

// LSTM, from dh and dc (the gradient reaching c_t), with tanh(c_t) recomputed:
//   do = dh ⊙ tanh(c_t),  dc += dh ⊙ o ⊙ (1 - tanh²(c_t))
//   di = dc ⊙ g,  df = dc ⊙ c_{t-1},  dg = dc ⊙ i,  dc_{t-1} = dc ⊙ f
//   dgates = [di i(1-i), df f(1-f), dg (1-g²), do o(1-o)]
// dc_rows (may be null): the gradient of the cell-state row c_t itself, strided like dout.
template <typename T>
void lstm_backward_rows(const T* gates, const T* c_prev, const T* c, const T* dh_in,
                        const T* dout, const T* dc_rows, int64_t st, int64_t sb, T* dc,
                        T* dgates, T* dh_out, int64_t H, int64_t b0, int64_t b1,
                        const int64_t* lengths, int64_t t) {
  using V = Vectorized<T>;
  const V one(T(1));
  for (int64_t b = b0; b < b1; ++b) {
    T* dg_b = dgates + b * 4 * H;
    const T* d_out = dout_row(dout, t, b, st, sb);
    const T* d_c = dout_row(dc_rows, t, b, st, sb);
    if (!active(lengths, b, t)) {  // (h_t, c_t) = (h_{t-1}, c_{t-1}): dh, dc carried
      zero_row(dg_b, 4 * H);
      add_row(dh_out + b * H, dh_in + b * H, d_out, H);
      add_row(dc + b * H, dc + b * H, d_c, H);
      continue;
    }
    const T* gb = gates + b * 4 * H;
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      V dh = load_dh<T>(dh_in + b * H, d_out, j, n);
      V i = V::loadu(gb + j, n), f = V::loadu(gb + H + j, n);
      V g = V::loadu(gb + 2 * H + j, n), o = V::loadu(gb + 3 * H + j, n);
      V tanh_c = fast_tanh(V::loadu(c + b * H + j, n));
      V dct = load_dh<T>(dc + b * H, d_c, j, n) + dh * o * (one - tanh_c * tanh_c);
      (dct * g * i * (one - i)).store(dg_b + j, n);
      (dct * V::loadu(c_prev + b * H + j, n) * f * (one - f)).store(dg_b + H + j, n);
      (dct * i * (one - g * g)).store(dg_b + 2 * H + j, n);
      (dh * tanh_c * o * (one - o)).store(dg_b + 3 * H + j, n);
      (dct * f).store(dc + b * H + j, n);
    }
    zero_row(dh_out + b * H, H);
  }
}

// GRU, from dh, with saved [r z n hh_n]:
//   dn_pre = dh ⊙ (1 - z) ⊙ (1 - n²),   dr_pre = dn_pre ⊙ hh_n ⊙ r(1 - r)
//   dz_pre = dh ⊙ (h_{t-1} - n) ⊙ z(1 - z)
//   dgates_x = [dr_pre, dz_pre, dn_pre],  dgates_h = [dr_pre, dz_pre, dn_pre ⊙ r]
//   dh_{t-1} = dh ⊙ z + dgates_h W_hh   (dh ⊙ z written here)
template <typename T>
void gru_backward_rows(const T* saved, const T* h_prev, const T* dh_in, const T* dout,
                       int64_t st, int64_t sb, T* dgx, T* dgh, T* dh_out, int64_t H,
                       int64_t b0, int64_t b1, const int64_t* lengths, int64_t t) {
  using V = Vectorized<T>;
  const V one(T(1));
  for (int64_t b = b0; b < b1; ++b) {
    T* dx_b = dgx + b * 3 * H;
    T* dh_b = dgh + b * 3 * H;
    const T* d_out = dout_row(dout, t, b, st, sb);
    if (!active(lengths, b, t)) {
      zero_row(dx_b, 3 * H);
      zero_row(dh_b, 3 * H);
      add_row(dh_out + b * H, dh_in + b * H, d_out, H);
      continue;
    }
    const T* s = saved + b * 4 * H;
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      V dh = load_dh<T>(dh_in + b * H, d_out, j, n);
      V r = V::loadu(s + j, n), z = V::loadu(s + H + j, n);
      V n_t = V::loadu(s + 2 * H + j, n), hn = V::loadu(s + 3 * H + j, n);
      V dn_pre = dh * (one - z) * (one - n_t * n_t);
      V dr_pre = dn_pre * hn * r * (one - r);
      V dz_pre = dh * (V::loadu(h_prev + b * H + j, n) - n_t) * z * (one - z);
      dr_pre.store(dx_b + j, n);
      dz_pre.store(dx_b + H + j, n);
      dn_pre.store(dx_b + 2 * H + j, n);
      dr_pre.store(dh_b + j, n);
      dz_pre.store(dh_b + H + j, n);
      (dn_pre * r).store(dh_b + 2 * H + j, n);
      (dh * z).store(dh_out + b * H + j, n);
    }
  }
}

// ------------------------------------------------------------------------------ loops

template <typename T>
void forward_loop(int64_t cell, int64_t Tn, int64_t B, int64_t H, T* xw, const T* w_hh,
                  const T* b_hh, T* hs, T* cs, T* saved, T* hh, const int64_t* lengths,
                  bool reverse) {
  const int64_t G = num_gates(cell), BH = B * H;
  const StepWeight<T> W_hh(w_hh, true, B, G * H, H, Tn);  // a Wᵀ for W_hh (G*H, H)
  for (int64_t step = 0; step < Tn; ++step) {
    const int64_t t = reverse ? Tn - 1 - step : step;
    const Slots at_ = slots(t, reverse);
    const T* h_prev = hs + at_.prev * BH;
    T* h = hs + at_.next * BH;
    T* a = xw + t * B * G * H;
    if (cell == GRU) {
      W_hh.apply(B, h_prev, H, T(0), hh, 3 * H);
      for_rows(B, 4 * H, [&](int64_t b0, int64_t b1) {
        gru_rows<T>(a, hh, b_hh, h_prev, h, saved + t * B * 4 * H, H, b0, b1, lengths, t);
      });
      continue;
    }
    W_hh.apply(B, h_prev, H, T(1), a, G * H);  // a = xw_t + W_hh h_{t-1}
    if (cell == LSTM) {
      const T* c_prev = cs + at_.prev * BH;
      T* c = cs + at_.next * BH;
      for_rows(B, 4 * H, [&](int64_t b0, int64_t b1) {
        lstm_rows<T>(a, h_prev, c_prev, h, c, H, b0, b1, lengths, t);
      });
    } else {
      for_rows(B, H, [&](int64_t b0, int64_t b1) {
        rnn_rows<T>(cell == RNN_RELU, a, h_prev, h, H, b0, b1, lengths, t);
      });
    }
  }
}

template <typename T>
void backward_loop(int64_t cell, int64_t Tn, int64_t B, int64_t H, const T* dout,
                   const T* dc_rows, int64_t st, int64_t sb, const T* w_hh, const T* hs,
                   const T* cs, const T* saved,
                   T* dgx, T* dgh, T* dh_a, T* dh_b, T* dc, const int64_t* lengths,
                   bool reverse) {
  const int64_t G = num_gates(cell), BH = B * H;
  const StepWeight<T> W_hh(w_hh, false, B, H, G * H, Tn);  // d W for W_hh (G*H, H)
  T* dh_in = dh_a;
  T* dh_out = dh_b;
  for (int64_t step = 0; step < Tn; ++step) {
    const int64_t t = reverse ? step : Tn - 1 - step;  // the forward's order, reversed
    const Slots at_ = slots(t, reverse);
    T* dg_x = dgx + t * B * G * H;
    T* dg_h = dg_x;
    if (cell == LSTM) {
      const T* gates = saved + t * B * 4 * H;
      const T* c_prev = cs + at_.prev * BH;
      const T* c = cs + at_.next * BH;
      for_rows(B, 4 * H, [&](int64_t b0, int64_t b1) {
        lstm_backward_rows<T>(gates, c_prev, c, dh_in, dout, dc_rows, st, sb, dc, dg_x, dh_out,
                              H, b0, b1, lengths, t);
      });
    } else if (cell == GRU) {
      dg_h = dgh + t * B * 3 * H;
      const T* h_prev = hs + at_.prev * BH;
      for_rows(B, 4 * H, [&](int64_t b0, int64_t b1) {
        gru_backward_rows<T>(saved + t * B * 4 * H, h_prev, dh_in, dout, st, sb, dg_x, dg_h,
                             dh_out, H, b0, b1, lengths, t);
      });
    } else {
      const T* h = hs + at_.next * BH;
      for_rows(B, H, [&](int64_t b0, int64_t b1) {
        rnn_backward_rows<T>(cell == RNN_RELU, h, dh_in, dout, st, sb, dg_x, dh_out, H, b0, b1,
                             lengths, t);
      });
    }
    W_hh.apply(B, dg_h, G * H, T(1), dh_out, H);  // + dgates_h W_hh
    std::swap(dh_in, dh_out);
  }
  if (dh_in != dh_a) {
    std::memcpy(dh_a, dh_in, sizeof(T) * BH);
  }
}

const int64_t* lengths_ptr(const c10::optional<Tensor>& lengths, int64_t B) {
  if (!lengths.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->is_contiguous() &&
                  lengths->numel() == B,
              "lengths: expected a contiguous int64 tensor of B elements");
  return lengths->data_ptr<int64_t>();
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), name,
              ": expected a contiguous CPU tensor");
}

// ------------------------------------------------------------------------------ entry points

// x (M, K) W (N, K)ᵀ + bias, a new contiguous (M, N) tensor.
Tensor project(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias) {
  const OneDNN* ops = x.scalar_type() == at::kFloat ? onednn() : nullptr;
  if (ops != nullptr && step_gemm != StepGemm::BLAS &&
      (step_gemm == StepGemm::ONEDNN || onednn_projection_pays(x.size(0), w.size(0), x.size(1)))) {
    return ops->linear.call(x, w, bias, "none", c10::List<std::optional<c10::Scalar>>(),
                            std::nullopt);
  }
  return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

// (hs (T+1, B, H), cs (T+1, B, H) or empty, saved) for one direction of one layer.
// saved: LSTM the activated gates (T, B, 4H); GRU [r z n hh_n] (T, B, 4H); RNN empty.
std::vector<Tensor> forward(int64_t cell, const Tensor& x, const Tensor& w_ih,
                            const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                            const c10::optional<Tensor>& b_hh, const Tensor& h0,
                            const c10::optional<Tensor>& c0,
                            const c10::optional<Tensor>& lengths, bool reverse) {
  TORCH_CHECK(cell >= RNN_TANH && cell <= GRU, "cell: expected 0..3");
  for (const Tensor* t : {&x, &w_ih, &w_hh, &h0}) {
    check_contiguous(*t, "x, w_ih, w_hh, h0");
  }
  const int64_t Tn = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  const int64_t G = num_gates(cell);
  TORCH_CHECK(w_ih.size(0) == G * H && w_ih.size(1) == I && w_hh.size(0) == G * H,
              "w_ih, w_hh: shapes do not match the cell");
  Tensor x2 = x.view({Tn * B, I});
  // the input projection of all T steps in one GEMM; the LSTM and RNN add b_hh here too
  c10::optional<Tensor> bias = b_ih;
  if (cell != GRU && b_hh.has_value()) {
    bias = b_ih.has_value() ? *b_ih + *b_hh : *b_hh;
  }
  Tensor xw = project(x2, w_ih, bias).view({Tn, B, G * H});
  Tensor hs = at::empty({Tn + 1, B, H}, x.options());
  hs[reverse ? Tn : 0].copy_(h0);
  Tensor cs = at::empty({0}, x.options());
  Tensor saved = at::empty({0}, x.options());
  Tensor hh = at::empty({0}, x.options());
  if (cell == LSTM) {
    TORCH_CHECK(c0.has_value(), "c0: required for the LSTM");
    cs = at::empty({Tn + 1, B, H}, x.options());
    cs[reverse ? Tn : 0].copy_(*c0);
    saved = xw;  // the gates are written over their pre-activations
  } else if (cell == GRU) {
    saved = at::empty({Tn, B, 4 * H}, x.options());
    hh = at::empty({B, 3 * H}, x.options());
  }
  Tensor b_hh_c;
  if (cell == GRU && b_hh.has_value()) {
    b_hh_c = b_hh->contiguous();
  }
  const int64_t* lens = lengths_ptr(lengths, B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqtwin_recurrent_forward", [&] {
    forward_loop<scalar_t>(cell, Tn, B, H, xw.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
                           b_hh_c.defined() ? b_hh_c.data_ptr<scalar_t>() : nullptr,
                           hs.data_ptr<scalar_t>(),
                           cell == LSTM ? cs.data_ptr<scalar_t>() : nullptr,
                           cell == GRU ? saved.data_ptr<scalar_t>() : nullptr,
                           cell == GRU ? hh.data_ptr<scalar_t>() : nullptr, lens, reverse);
  });
  return {hs, cs, saved};
}

// (dgates_x (T, B, G*H), dgates_h (T, B, 3H) for the GRU else empty, dh0 (B, H),
//  dc0 (B, H) for the LSTM else empty) from dout (T, B, H), the gradients of the state rows
// h_t (any row strides; may be None), dc_rows likewise for the LSTM's c_t (may be None),
// dh_n, dc_n (B, H) or None, and the forward's outputs.
std::vector<Tensor> backward(int64_t cell, const c10::optional<Tensor>& dout,
                             const c10::optional<Tensor>& dc_rows,
                             const c10::optional<Tensor>& dh_n,
                             const c10::optional<Tensor>& dc_n, const Tensor& w_hh,
                             const Tensor& hs, const Tensor& cs, const Tensor& saved,
                             const c10::optional<Tensor>& lengths, bool reverse) {
  TORCH_CHECK(cell >= RNN_TANH && cell <= GRU, "cell: expected 0..3");
  check_contiguous(w_hh, "w_hh");
  check_contiguous(hs, "hs");
  const int64_t Tn = hs.size(0) - 1, B = hs.size(1), H = hs.size(2);
  const int64_t G = num_gates(cell);
  auto options = hs.options();
  // dout and dc_rows share row strides: a view with unit inner stride is read in place
  Tensor d_out, d_c;
  if (dout.has_value()) {
    d_out = dout->stride(2) == 1 ? *dout : dout->contiguous();
  }
  if (dc_rows.has_value() && cell == LSTM) {
    d_c = dc_rows->contiguous();
    if (d_out.defined() && d_out.strides() != d_c.strides()) {
      d_out = d_out.contiguous();
    }
    if (!d_out.defined()) {
      d_out = at::zeros_like(d_c);
    }
  }
  const int64_t st = d_out.defined() ? d_out.stride(0) : 0;
  const int64_t sb = d_out.defined() ? d_out.stride(1) : 0;
  Tensor dgx = at::empty({Tn, B, G * H}, options);
  Tensor dgh = cell == GRU ? at::empty({Tn, B, 3 * H}, options) : at::empty({0}, options);
  Tensor dh0 = dh_n.has_value() ? dh_n->contiguous().clone() : at::zeros({B, H}, options);
  Tensor dh_tmp = at::empty({B, H}, options);
  Tensor dc0 = at::empty({0}, options);
  if (cell == LSTM) {
    check_contiguous(cs, "cs");
    dc0 = dc_n.has_value() ? dc_n->contiguous().clone() : at::zeros({B, H}, options);
  }
  const int64_t* lens = lengths_ptr(lengths, B);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "seqtwin_recurrent_backward", [&] {
    backward_loop<scalar_t>(
        cell, Tn, B, H, d_out.defined() ? d_out.data_ptr<scalar_t>() : nullptr,
        d_c.defined() ? d_c.data_ptr<scalar_t>() : nullptr, st, sb, w_hh.data_ptr<scalar_t>(),
        hs.data_ptr<scalar_t>(), cell == LSTM ? cs.data_ptr<scalar_t>() : nullptr,
        saved.numel() ? saved.data_ptr<scalar_t>() : nullptr, dgx.data_ptr<scalar_t>(),
        cell == GRU ? dgh.data_ptr<scalar_t>() : nullptr, dh0.data_ptr<scalar_t>(),
        dh_tmp.data_ptr<scalar_t>(), cell == LSTM ? dc0.data_ptr<scalar_t>() : nullptr, lens,
        reverse);
  });
  return {dgx, dgh, dh0, dc0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "one direction of one recurrent layer over all steps");
  m.def("backward", &backward, "its backward: dgates and the initial states' gradients");
  m.def("set_step_gemm",
        [](const std::string& mode) {
          TORCH_CHECK(mode == "auto" || mode == "blas" || mode == "onednn",
                      "step_gemm: expected 'auto', 'blas' or 'onednn', got '", mode, "'");
          step_gemm = mode == "auto" ? StepGemm::AUTO
                      : mode == "blas" ? StepGemm::BLAS : StepGemm::ONEDNN;
        },
        "float32 products: 'auto' (oneDNN where it pays), 'blas' or 'onednn' (tests)");
  m.def("get_step_gemm", [] {
    return std::string(step_gemm == StepGemm::AUTO ? "auto"
                       : step_gemm == StepGemm::BLAS ? "blas" : "onednn");
  });
  m.def("packings", [] { return packings.load(); },
        "how many weights were reordered for oneDNN so far");
}
