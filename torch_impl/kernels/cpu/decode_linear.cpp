// The products of a decode step on the CPU: y = x W + b for the few rows of one generated
// token per sequence (M = batch x beams, typically 1..32), W (K, N) row-major as GPT-2's
// Conv1D stores it (and the tied head as a (E, V) copy of wte's transpose).
//
//     y[m, n] = b[n] + Σ_k x[m, k] W[k, n]
//
// At small M such a product is a read of W and little else: its speed is the rate at which W
// streams from memory. A BLAS sgemm pays for packing W into panels first, which at M = 1..8
// reads and writes W once more than the product needs (on this project's CPU addmm reached a
// third of the read bandwidth at M = 1, and a transposed head far less). Here each thread
// owns a block of 64 columns, walks its K rows once per tile of up to 8 rows of x, and keeps
// the tile's outputs in registers (at::vec::Vectorized accumulators, one FMA per weight and
// row); W is read from memory once per call, its later row tiles find it in the caches.
// Columns past the last full vector are summed by a scalar loop. float32 and float64; the
// sum over k runs in k order for every element, so the result depends neither on the number
// of threads nor on M.
//
// Inputs are trusted: x (M, K), W (K, N) contiguous, b (N,) or undefined, one dtype (the
// Python caller, a decode session, checked the model once per generate call).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

using at::vec::Vectorized;

namespace {

constexpr int64_t kBlockColumns = 64;  // columns per parallel task

// Rows [m0, m0 + R) x vectors [j0, j0 + C * Vec::size()) of y, all K rows of W summed into
// R x C register accumulators.
template <typename T, int R, int C>
void tile(const T* x, const T* w, const T* b, T* y, int64_t m0, int64_t j0, int64_t K,
          int64_t N) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[R][C];
  for (int c = 0; c < C; ++c) {
    Vec bias = b ? Vec::loadu(b + j0 + c * V) : Vec(T(0));
    for (int r = 0; r < R; ++r) acc[r][c] = bias;
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* row = w + k * N + j0;
    Vec wk[C];
    for (int c = 0; c < C; ++c) wk[c] = Vec::loadu(row + c * V);
    for (int r = 0; r < R; ++r) {
      Vec xk(x[(m0 + r) * K + k]);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xk, wk[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c].store(y + (m0 + r) * N + j0 + c * V);
}

// One vector-column strip group [j0, j1) of y for every row: 8 rows at a time, then 4, 2, 1,
// with as many vectors per tile as keep 16 accumulators or fewer in registers.
template <typename T>
void columns(const T* x, const T* w, const T* b, T* y, int64_t M, int64_t K, int64_t N,
             int64_t j0, int64_t j1) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) {
    int64_t j = j0;
    for (; j + 2 * V <= j1; j += 2 * V) tile<T, 8, 2>(x, w, b, y, m, j, K, N);
    for (; j < j1; j += V) tile<T, 8, 1>(x, w, b, y, m, j, K, N);
  }
  for (; m + 4 <= M; m += 4) {
    int64_t j = j0;
    for (; j + 4 * V <= j1; j += 4 * V) tile<T, 4, 4>(x, w, b, y, m, j, K, N);
    for (; j < j1; j += V) tile<T, 4, 1>(x, w, b, y, m, j, K, N);
  }
  for (; m + 2 <= M; m += 2) {
    int64_t j = j0;
    for (; j + 4 * V <= j1; j += 4 * V) tile<T, 2, 4>(x, w, b, y, m, j, K, N);
    for (; j < j1; j += V) tile<T, 2, 1>(x, w, b, y, m, j, K, N);
  }
  for (; m < M; ++m) {
    int64_t j = j0;
    for (; j + 4 * V <= j1; j += 4 * V) tile<T, 1, 4>(x, w, b, y, m, j, K, N);
    for (; j < j1; j += V) tile<T, 1, 1>(x, w, b, y, m, j, K, N);
  }
}

template <typename T>
void linear_kernel(const T* x, const T* w, const T* b, T* y, int64_t M, int64_t K,
                   int64_t N) {
  constexpr int64_t V = Vectorized<T>::size();
  const int64_t full = N / V * V;  // columns covered by whole vectors
  const int64_t blocks = (full + kBlockColumns - 1) / kBlockColumns;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j0 = block * kBlockColumns;
      columns<T>(x, w, b, y, M, K, N, j0, std::min(full, j0 + kBlockColumns));
    }
  });
  for (int64_t m = 0; m < M; ++m) {  // the last N - full columns
    for (int64_t n = full; n < N; ++n) {
      T sum = b ? b[n] : T(0);
      for (int64_t k = 0; k < K; ++k) sum += x[m * K + k] * w[k * N + n];
      y[m * N + n] = sum;
    }
  }
}

}  // namespace

// y (M, N) = x (M, K) W (K, N) + b (N,) (b undefined: no bias).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqtwin_decode_linear", [&] {
    linear_kernel<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            has_bias ? bias->data_ptr<scalar_t>() : nullptr,
                            y.data_ptr<scalar_t>(), M, K, N);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y (M, N) = x (M, K) W (K, N) + b for a decode step's few rows",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
}
