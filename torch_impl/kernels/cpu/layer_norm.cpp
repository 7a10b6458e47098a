// seqtwin::layer_norm on the CPU: forward and backward of LayerNorm over the last axis, the
// native twin of the Triton kernels in kernels/layer_norm.py.
//
// For one row x (D,), with biased variance as in torch:
//
//     μ = (1/D) Σ_i x_i           σ² = (1/D) Σ_i (x_i - μ)²        r = 1 / √(σ² + ε)
//     x̂ = (x - μ) r               y = x̂ ⊙ w + b
//
// Backward, from dy (summing over every row n for the parameters):
//
//     dw = Σ_n dy_n ⊙ x̂_n         db = Σ_n dy_n
//     dx̂ = dy ⊙ w
//     dx = r (dx̂ - mean(dx̂) - x̂ mean(dx̂ ⊙ x̂))      (means over the row)
//
// Everything is computed in the input dtype (float32 or float64); μ and r are saved per row in
// that dtype. Extreme rows: where Σ x or Σ (x - μ0)² overflows the dtype (float32 rows of
// values near 1e19 and beyond), the row is redone on u = x / 2^e, 2^e the power of two at its
// largest |x| (an exact scaling): the statistics of u never overflow, and μ = 2^e μ_u,
// r = r_u / 2^e with r_u = 1 / √(σ_u² + ε / 4^e), so the row gets LayerNorm's exact-math
// value (rows whose values differ by more than the dtype's largest number excepted). The forward reads each row three times while it sits in L1 (a first mean μ0,
// then the corrected two-pass sums of x - μ0 that give μ and σ² at any offset of the row,
// then y). The backward reads each row twice (the two means, then dx), four rows at a time,
// and adds their dy ⊙ x̂ and dy into the dw, db partial sums of its block of rows. The blocks
// are fixed by N and D alone and their partials summed in block order, so dw and db depend
// neither on thread timing nor on the number of threads.
//
// Parallel over rows (forward) or row blocks (backward); vectorised over the row with
// at::vec::Vectorized, the tail of a row by masked loads and stores. Bound: forward and
// backward (the bodies of the seqtwin:: ops), and layer_norm, the two tied by a C++ autograd
// Function for eager callers.
// Inputs are trusted: x and dy contiguous (..., D), read as their N = numel / D rows (the op
// passes (N, D); eager callers pass x as it is, saving two reshapes), (D,) parameters, (N,)
// statistics of x's dtype (the public Python entry validated them and made them contiguous).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>

using at::vec::Vectorized;

namespace {

// about at::internal::GRAIN_SIZE elements per task, so that small inputs stay on one thread
int64_t rows_per_task(int64_t D) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / D);
}

// Σ of a vector's lanes, in lane order
template <typename scalar_t>
scalar_t sum_lanes(const Vectorized<scalar_t>& v) {
  scalar_t lanes[Vectorized<scalar_t>::size()];
  v.store(lanes);
  scalar_t sum = 0;
  for (int64_t k = 0; k < Vectorized<scalar_t>::size(); ++k) sum += lanes[k];
  return sum;
}

template <typename scalar_t>
Vectorized<scalar_t> load(const scalar_t* p, int64_t n) {
  return n == Vectorized<scalar_t>::size() ? Vectorized<scalar_t>::loadu(p)
                                           : Vectorized<scalar_t>::loadu(p, n);
}

template <typename scalar_t>
void store(const Vectorized<scalar_t>& v, scalar_t* p, int64_t n) {
  if (n == Vectorized<scalar_t>::size()) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// Σ_i x_i over a row of D
template <typename scalar_t>
scalar_t row_sum(const scalar_t* x, int64_t D) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  // four accumulators: the loads outrun one chain of dependent adds
  Vec s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * W <= D; i += 4 * W) {
    s0 += Vec::loadu(x + i);
    s1 += Vec::loadu(x + i + W);
    s2 += Vec::loadu(x + i + 2 * W);
    s3 += Vec::loadu(x + i + 3 * W);
  }
  for (; i + W <= D; i += W) s0 += Vec::loadu(x + i);
  if (i < D) s1 += Vec::loadu(x + i, D - i);                  // zeros past D
  return sum_lanes<scalar_t>((s0 + s1) + (s2 + s3));
}

// ------------------------------------------------------------------------------- forward

// the row of forward_row whose direct sums overflowed, on u = x / 2^e (see the header)
template <typename scalar_t>
void forward_row_scaled(const scalar_t* x, const scalar_t* w, const scalar_t* b,
                        scalar_t eps, int64_t D, scalar_t* y, scalar_t* mean_out,
                        scalar_t* rstd_out) {
  scalar_t top = 0;
  for (int64_t i = 0; i < D; ++i) top = std::max(top, std::abs(x[i]));
  const int e = std::ilogb(top);                      // top >= 2^e: overflow needs a big top
  const scalar_t down = std::ldexp(scalar_t(1), -e), up = std::ldexp(scalar_t(1), e);
  scalar_t sum = 0;
  for (int64_t i = 0; i < D; ++i) sum += x[i] * down;
  const scalar_t mean0 = sum / static_cast<scalar_t>(D);
  scalar_t d = 0, q = 0;
  for (int64_t i = 0; i < D; ++i) {
    const scalar_t c = x[i] * down - mean0;
    d += c;
    q += c * c;
  }
  const scalar_t shift = d / static_cast<scalar_t>(D);
  const scalar_t var = std::max(q / static_cast<scalar_t>(D) - shift * shift, scalar_t(0));
  // ε / 4^e may underflow to 0: a constant row (σ_u² = 0) then has x̂ = 0 and r = 1 / √ε
  const scalar_t rstd_u = var > 0 ? scalar_t(1) / std::sqrt(var + eps * down * down)
                                  : scalar_t(0);
  for (int64_t i = 0; i < D; ++i) {
    y[i] = ((x[i] * down - mean0) - shift) * rstd_u * w[i] + b[i];
  }
  *mean_out = (mean0 + shift) * up;
  *rstd_out = var > 0 ? rstd_u * down : scalar_t(1) / std::sqrt(eps);
}

template <typename scalar_t>
void forward_row(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t eps,
                 int64_t D, scalar_t* y, scalar_t* mean_out, scalar_t* rstd_out) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  // the corrected two-pass algorithm: μ0 = Σ x / D, then Σ (x - μ0) and Σ (x - μ0)² in one
  // pass; the first is D times μ0's rounding error δ (μ = μ0 + δ), the second less D δ² is
  // D σ². Accurate at any offset of the row, as a plain two-pass σ² is, and x - μ is taken
  // as (x - μ0) - δ, finer than a μ rounded to the dtype can give
  const scalar_t mean0 = row_sum(x, D) / static_cast<scalar_t>(D);
  const Vec vmean0(mean0);
  Vec d0(0), d1(0), q0(0), q1(0);
  int64_t i = 0;
  for (; i + 2 * W <= D; i += 2 * W) {
    const Vec c0 = Vec::loadu(x + i) - vmean0, c1 = Vec::loadu(x + i + W) - vmean0;
    d0 += c0;
    d1 += c1;
    q0 = at::vec::fmadd(c0, c0, q0);
    q1 = at::vec::fmadd(c1, c1, q1);
  }
  for (; i < D; i += W) {
    const int64_t n = std::min<int64_t>(W, D - i);
    const Vec c = n == W ? Vec::loadu(x + i) - vmean0
                         : Vec::set(Vec(0), Vec::loadu(x + i, n) - vmean0, n);
    d0 += c;
    q0 = at::vec::fmadd(c, c, q0);
  }
  const scalar_t shift = sum_lanes<scalar_t>(d0 + d1) / static_cast<scalar_t>(D);
  const scalar_t squares = sum_lanes<scalar_t>(q0 + q1);
  if (!std::isfinite(mean0) || !std::isfinite(squares)) {   // x is finite: an overflow
    forward_row_scaled(x, w, b, eps, D, y, mean_out, rstd_out);
    return;
  }
  const scalar_t var = std::max(squares / static_cast<scalar_t>(D) - shift * shift,
                                scalar_t(0));
  const Vec vshift(shift);
  const scalar_t rstd = scalar_t(1) / std::sqrt(var + eps);
  const Vec vrstd(rstd);
  for (i = 0; i < D; i += W) {
    const int64_t n = std::min<int64_t>(W, D - i);
    const Vec x_hat = ((load(x + i, n) - vmean0) - vshift) * vrstd;
    store(at::vec::fmadd(x_hat, load(w + i, n), load(b + i, n)), y + i, n);
  }
  *mean_out = mean0 + shift;
  *rstd_out = rstd;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& bias, double eps) {
  const int64_t D = x.size(-1), N = x.numel() / D;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N}, x.options());
  at::Tensor rstd = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqtwin_layer_norm_forward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pw = weight.data_ptr<scalar_t>();
    const scalar_t* pb = bias.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    scalar_t* pmean = mean.data_ptr<scalar_t>();
    scalar_t* prstd = rstd.data_ptr<scalar_t>();
    const scalar_t eps_t = static_cast<scalar_t>(eps);  // ε in the compute dtype, as torch's
    at::parallel_for(0, N, rows_per_task(D), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        forward_row(px + row * D, pw, pb, eps_t, D, py + row * D, pmean + row, prstd + row);
      }
    });
  });
  return {y, mean, rstd};
}

// ------------------------------------------------------------------------------- backward

// the rows a backward step reads together: each load and store of dw, db serves them all
constexpr int64_t ROWS_PER_STEP = 4;
// the backward's row blocks, each with its own dw, db partial sums: at most this many
constexpr int64_t MAX_BLOCKS = 64;

// dx of R consecutive rows (row stride D); their dy ⊙ x̂ and dy added into dw, db
template <int64_t R, typename scalar_t>
void backward_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* w,
                   const scalar_t* mean, const scalar_t* rstd, int64_t D, scalar_t* dx,
                   scalar_t* dw, scalar_t* db) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  Vec vmean[R], vrstd[R], sum[R], dot[R];
  for (int64_t r = 0; r < R; ++r) {
    vmean[r] = Vec(mean[r]);
    vrstd[r] = Vec(rstd[r]);
    sum[r] = dot[r] = Vec(0);
  }
  // Σ dx̂ and Σ dx̂ ⊙ x̂ per row, dw and db over the rows. dx̂ = dy ⊙ w goes through dx,
  // which the second loop overwrites: a stored product is rounded once, so no fused
  // multiply-add can make dx̂ - mean(dx̂) differ from the sum it came from (at D = 1 that
  // difference must be exactly 0, as x̂ is). Zeros past n: dy = 0 there adds nothing.
  const auto sums = [&](int64_t i, int64_t n) {
    const Vec w_i = load(w + i, n);
    Vec dw_i = load(dw + i, n), db_i = load(db + i, n);
    for (int64_t r = 0; r < R; ++r) {
      const Vec dy_ri = load(dy + r * D + i, n);
      const Vec x_hat = (load(x + r * D + i, n) - vmean[r]) * vrstd[r];
      const Vec dx_hat = dy_ri * w_i;
      store(dx_hat, dx + r * D + i, n);
      sum[r] += dx_hat;
      dot[r] = at::vec::fmadd(dx_hat, x_hat, dot[r]);
      dw_i = at::vec::fmadd(dy_ri, x_hat, dw_i);
      db_i += dy_ri;
    }
    store(dw_i, dw + i, n);
    store(db_i, db + i, n);
  };
  int64_t i = 0;
  for (; i + W <= D; i += W) sums(i, W);
  if (i < D) sums(i, D - i);
  for (int64_t r = 0; r < R; ++r) {
    const Vec mean_dx_hat(sum_lanes<scalar_t>(sum[r]) / static_cast<scalar_t>(D));
    const Vec mean_dot(sum_lanes<scalar_t>(dot[r]) / static_cast<scalar_t>(D));
    scalar_t* dx_r = dx + r * D;
    for (int64_t j = 0; j < D; j += W) {
      const int64_t n = std::min<int64_t>(W, D - j);
      const Vec x_hat = (load(x + r * D + j, n) - vmean[r]) * vrstd[r];
      store(vrstd[r] * ((load(dx_r + j, n) - mean_dx_hat) - x_hat * mean_dot), dx_r + j, n);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy,
                                                        const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        const at::Tensor& mean,
                                                        const at::Tensor& rstd) {
  const int64_t D = x.size(-1), N = x.numel() / D;
  const int64_t rows_per_block = std::max(at::divup(N, MAX_BLOCKS), rows_per_task(D));
  const int64_t blocks = std::max<int64_t>(at::divup(N, rows_per_block), 1);
  at::Tensor dx = at::empty_like(x);
  // one block (small inputs) sums straight into dw, db; more sum into their own partials
  at::Tensor dw_part = at::zeros({blocks, D}, x.options());
  at::Tensor db_part = at::zeros({blocks, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqtwin_layer_norm_backward", [&] {
    const scalar_t* pdy = dy.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pw = weight.data_ptr<scalar_t>();
    const scalar_t* pmean = mean.data_ptr<scalar_t>();
    const scalar_t* prstd = rstd.data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    scalar_t* pdw = dw_part.data_ptr<scalar_t>();
    scalar_t* pdb = db_part.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t row_end = std::min(N, (block + 1) * rows_per_block);
        int64_t row = block * rows_per_block;
        for (; row + ROWS_PER_STEP <= row_end; row += ROWS_PER_STEP) {
          backward_rows<ROWS_PER_STEP>(pdy + row * D, px + row * D, pw, pmean + row,
                                       prstd + row, D, pdx + row * D, pdw + block * D,
                                       pdb + block * D);
        }
        for (; row < row_end; ++row) {
          backward_rows<1>(pdy + row * D, px + row * D, pw, pmean + row, prstd + row, D,
                           pdx + row * D, pdw + block * D, pdb + block * D);
        }
      }
    });
  });
  if (blocks == 1) {
    return {dx, dw_part.view({D}), db_part.view({D})};
  }
  at::Tensor dweight = at::empty({D}, x.options());
  at::Tensor dbias = at::empty({D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqtwin_layer_norm_backward_sum", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* pdw = dw_part.data_ptr<scalar_t>();
    const scalar_t* pdb = db_part.data_ptr<scalar_t>();
    scalar_t* out_dw = dweight.data_ptr<scalar_t>();
    scalar_t* out_db = dbias.data_ptr<scalar_t>();
    // the partials in block order, column by column: the same order on any thread count
    for (int64_t j = 0; j < D; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), D - j);
      Vec sum_dw(0), sum_db(0);
      for (int64_t block = 0; block < blocks; ++block) {
        sum_dw += load(pdw + block * D + j, n);
        sum_db += load(pdb + block * D + j, n);
      }
      store(sum_dw, out_dw + j, n);
      store(sum_db, out_db + j, n);
    }
  });
  return {dx, dweight, dbias};
}

// ------------------------------------------------------------------------------- autograd

// forward and backward tied by autograd in C++, for eager callers (kernels/layer_norm.py's
// layer_norm): a Python autograd.Function would add ~10 µs per forward and backward, about as
// much as the kernels take at 64 rows of 256. Saves x, w, μ and r, as the op's autograd does.
struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias, double eps) {
    auto [y, mean, rstd] = ::forward(x, weight, bias, eps);
    ctx->save_for_backward({x, weight, mean, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // the kernels are not differentiable themselves
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "seqtwin layer_norm: the native kernels have no double backward");
    const auto saved = ctx->get_saved_variables();
    auto [dx, dweight, dbias] =
        ::backward(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3]);
    return {dx, dweight, dbias, at::Tensor()};
  }
};

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      double eps) {
  return LayerNormFunction::apply(x, weight, bias, eps);
}

}  // namespace

// ------------------------------------------------------------------------------- bindings

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "(y (..., D), mean (N,), rstd (N,)) of LayerNorm over x (..., D)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"));
  m.def("backward", &backward, "(dx (..., D), dweight (D,), dbias (D,)) of LayerNorm",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("mean"), pybind11::arg("rstd"));
  m.def("layer_norm", &layer_norm, "y (..., D): forward, with backward under autograd",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"));
}
