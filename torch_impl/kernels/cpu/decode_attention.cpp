// The attention of a decode step on the CPU: one new query per row and head against the
// preallocated key/value cache, with the new key and value written into it first.
//
// For row n, head h (d = E / heads, s = 1/√d), the step's qkv (N, 3E) = [q | k | v], and the
// cache K, V (N, heads, C, d) holding positions 0..t-1 of the row:
//
//     K[n, h, t] = k[n, h]      V[n, h, t] = v[n, h]
//     e_j = s q[n, h] · K[n, h, j]          for j = 0..t with valid[n, j] (all j without it)
//     p_j = exp(e_j - max e) / Σ exp(e - max e)
//     a[n, h] = Σ_j p_j V[n, h, j]                        a (N, E), heads side by side
//
// A query of length 1 needs no tiling: each (n, h) pair is one task (at::parallel_for), its
// t + 1 scores in a small buffer, the dot products and the weighted sum of values vectorised
// over d with at::vec::Vectorized (a scalar loop for d's tail). Replaces, per layer and step,
// the split of qkv, two strided cache writes and a flash-attention call built for long
// queries (on this project's CPU those took about half of a batch-8 decode step).
// float32 and float64; the sums run in j order, so the result does not depend on threads.
//
// Inputs are trusted: qkv (N, 3E) contiguous, caches (N, heads, C, d) contiguous with
// t < C, valid (N, C) bool or undefined, one dtype (the decode session made them).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using at::vec::Vectorized;

namespace {

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + V <= d; i += V) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  T lanes[V];
  acc.store(lanes);
  T sum = 0;
  for (int64_t l = 0; l < V; ++l) sum += lanes[l];
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// out[0..d) += p * v[0..d)
template <typename T>
void axpy(T p, const T* v, T* out, int64_t d) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + V <= d; i += V)
    at::vec::fmadd(Vec(p), Vec::loadu(v + i), Vec::loadu(out + i)).store(out + i);
  for (; i < d; ++i) out[i] += p * v[i];
}

template <typename T>
void attend_kernel(const T* qkv, T* keys, T* values, const bool* valid, T* out, int64_t N,
                   int64_t heads, int64_t C, int64_t d, int64_t t, T scale) {
  const int64_t E = heads * d;
  at::parallel_for(0, N * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> e(t + 1);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / heads, h = task % heads;
      const T* q = qkv + n * 3 * E + h * d;
      T* K = keys + (n * heads + h) * C * d;
      T* Vv = values + (n * heads + h) * C * d;
      std::copy(q + E, q + E + d, K + t * d);       // K[n, h, t] = k[n, h]
      std::copy(q + 2 * E, q + 2 * E + d, Vv + t * d);
      const bool* keep = valid ? valid + n * C : nullptr;
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j <= t; ++j) {
        e[j] = (keep && !keep[j]) ? -std::numeric_limits<T>::infinity()
                                  : scale * dot(q, K + j * d, d);
        top = std::max(top, e[j]);
      }
      T total = 0;
      for (int64_t j = 0; j <= t; ++j) {
        e[j] = (keep && !keep[j]) ? T(0) : std::exp(e[j] - top);
        total += e[j];
      }
      T* a = out + n * E + h * d;
      std::fill(a, a + d, T(0));
      const T inv = T(1) / total;
      for (int64_t j = 0; j <= t; ++j)
        if (e[j] != T(0)) axpy(e[j] * inv, Vv + j * d, a, d);
    }
  });
}

}  // namespace

// a (N, E): the step's attention; writes the new k, v at slot t of the caches first.
at::Tensor attend(const at::Tensor& qkv, at::Tensor& keys, at::Tensor& values, int64_t t,
                  const c10::optional<at::Tensor>& valid) {
  const int64_t N = keys.size(0), heads = keys.size(1), C = keys.size(2), d = keys.size(3);
  at::Tensor out = at::empty({N, heads * d}, qkv.options());
  const bool* keep = (valid.has_value() && valid->defined()) ? valid->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "seqtwin_decode_attend", [&] {
    attend_kernel<scalar_t>(qkv.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(),
                            values.data_ptr<scalar_t>(), keep, out.data_ptr<scalar_t>(), N,
                            heads, C, d, t, scalar_t(1.0 / std::sqrt(double(d))));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend,
        "a (N, E) of one query per row against the KV cache, after writing k, v at slot t",
        py::arg("qkv"), py::arg("keys"), py::arg("values"), py::arg("t"),
        py::arg("valid") = py::none());
}
