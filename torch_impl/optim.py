"""Optimizers, gradient clipping and the learning-rate schedule, with torch.optim's update math.

Every optimizer holds a reference to a dict of named parameter tensors (e.g.
``dict(model.named_parameters())``) and updates those tensors in place, under
``torch.no_grad()``, on ``step(grads)``; ``grads`` is a dict with the same names
(e.g. ``{n: p.grad for n, p in model.named_parameters()}``). The step count t
starts at 1 on the first step. With g_t the gradient and θ the parameter:

SGD (``torch.optim.SGD``), weight decay λ, momentum μ, dampening τ:

    g_t = g_t + λ θ_{t-1}
    b_t = g_t                               (t = 1)
    b_t = μ b_{t-1} + (1 - τ) g_t           (t > 1)
    g_t = g_t + μ b_t  (nesterov)   or   g_t = b_t      (when μ ≠ 0)
    θ_t = θ_{t-1} - lr g_t

Adam (``torch.optim.Adam``; λ is an L2 term added to the gradient):

    g_t = g_t + λ θ_{t-1}
    m_t = β1 m_{t-1} + (1 - β1) g_t
    v_t = β2 v_{t-1} + (1 - β2) g_t²
    m̂_t = m_t / (1 - β1^t);   v̂_t = v_t / (1 - β2^t)
    θ_t = θ_{t-1} - lr m̂_t / (√v̂_t + ε)

AdamW (``torch.optim.AdamW``; decoupled decay, applied before the Adam step):

    θ_{t-1} ← θ_{t-1} - lr λ θ_{t-1}, then Adam above with no L2 term.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .checks import check_float_tensor

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by total_norm + 1e-6


def _check_hyper(name: str, value: object, low: float = 0.0, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite float in [low, high) (or (low, high) when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) \
        and (high is None or value < high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name}: expected a float in {interval}, got {value}")
    return value


def _check_betas(betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    return (_check_hyper("betas[0]", betas[0], 0.0, 1.0),
            _check_hyper("betas[1]", betas[1], 0.0, 1.0))


def _check_params(params: object) -> dict[str, Tensor]:
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of names to tensors, "
                        f"got {type(params).__name__}")
    for name, p in params.items():
        check_float_tensor(f"params[{name!r}]", p)
    return params


def _check_buffers(name: str, buffers: object, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Copies of a state_dict's per-parameter buffers on their param's device and dtype."""
    if not isinstance(buffers, Mapping):
        raise TypeError(f"state_dict[{name!r}]: expected a mapping of parameter names to "
                        f"tensors, got {type(buffers).__name__}")
    unknown = sorted(set(buffers) - set(params))
    if unknown:
        raise ValueError(f"state_dict[{name!r}]: unexpected keys {unknown} (not in params)")
    out = {}
    for key, value in buffers.items():
        p = params[key]
        check_float_tensor(f"state_dict[{name!r}][{key!r}]", value, shape=p.shape)
        out[key] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
    return out


class Optimizer:
    """Named parameters, a settable ``lr`` and the step count t shared by the subclasses."""

    def __init__(self, params: dict[str, Tensor], lr: float) -> None:
        self.params = _check_params(params)
        self.lr = lr
        self.step_count = 0

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_hyper("lr", value)

    def _check_grads(self, grads: object) -> dict[str, Tensor]:
        """grads: exactly the keys of params, each finite with its parameter's shape and dtype."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads: expected a dict of names to tensors, "
                            f"got {type(grads).__name__}")
        missing = sorted(set(self.params) - set(grads))
        unexpected = sorted(set(grads) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"grads: missing keys {missing}, unexpected keys {unexpected} "
                             f"(expected the keys of params)")
        for name, p in self.params.items():
            check_float_tensor(f"grads[{name!r}]", grads[name], shape=p.shape, dtype=p.dtype)
        return dict(grads)

    def _check_step(self, state_dict: object) -> int:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        step = state_dict.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict['step']: expected an int >= 0, got {step!r}")
        return step


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay.

    SGD(params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0).
    """

    def __init__(self, params: dict[str, Tensor], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.momentum = _check_hyper("momentum", momentum)
        self.dampening = _check_hyper("dampening", dampening)
        self.weight_decay = _check_hyper("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__}")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(f"nesterov: requires momentum > 0 and dampening = 0, got "
                             f"momentum {self.momentum}, dampening {self.dampening}")
        self.nesterov = nesterov
        self.momentum_buffer: dict[str, Tensor] = {}  # b

    @torch.no_grad()
    def step(self, grads: Mapping[str, Tensor]) -> None:
        """One update of every parameter in place, from ``grads`` keyed like params."""
        grads = self._check_grads(grads)
        self.step_count += 1
        mu, tau, lam = self.momentum, self.dampening, self.weight_decay
        for name, theta in self.params.items():
            g = grads[name]
            if lam != 0:
                g = g + lam * theta
            if mu != 0:
                b = self.momentum_buffer.get(name)
                if b is None:
                    b = self.momentum_buffer[name] = g.detach().clone()
                else:
                    b.mul_(mu).add_(g, alpha=1 - tau)
                g = g + mu * b if self.nesterov else b
            theta.sub_(self.lr * g)

    def state_dict(self) -> dict[str, Any]:
        """{"step": t, "momentum_buffer": {name: b}} (copies)."""
        return {"step": self.step_count,
                "momentum_buffer": {k: b.clone() for k, b in self.momentum_buffer.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        step = self._check_step(state_dict)
        buffers = _check_buffers("momentum_buffer", state_dict.get("momentum_buffer", {}),
                                 self.params)
        self.step_count, self.momentum_buffer = step, buffers


class Adam(Optimizer):
    """Adam with bias correction; ``weight_decay`` adds λθ to the gradient (L2), as torch.

    Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).
    """

    decoupled = False  # AdamW sets this: decay the weights instead of the gradient

    def __init__(self, params: dict[str, Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.betas = _check_betas(betas)
        self.eps = _check_hyper("eps", eps, low_open=True)
        self.weight_decay = _check_hyper("weight_decay", weight_decay)
        self.exp_avg: dict[str, Tensor] = {}     # m
        self.exp_avg_sq: dict[str, Tensor] = {}  # v

    @torch.no_grad()
    def step(self, grads: Mapping[str, Tensor]) -> None:
        """One update of every parameter in place, from ``grads`` keyed like params."""
        grads = self._check_grads(grads)
        self.step_count += 1
        t, lr, lam, eps = self.step_count, self.lr, self.weight_decay, self.eps
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        for name, theta in self.params.items():
            g = grads[name]
            if self.decoupled:
                theta.mul_(1 - lr * lam)
            elif lam != 0:
                g = g + lam * theta
            if name not in self.exp_avg:
                self.exp_avg[name] = torch.zeros_like(theta, memory_format=torch.preserve_format)
                self.exp_avg_sq[name] = torch.zeros_like(theta,
                                                         memory_format=torch.preserve_format)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / bias_correction2).sqrt_().add_(eps)  # √v̂ + ε
            theta.addcdiv_(m, denom, value=-lr / bias_correction1)  # m̂ = m / (1 - β1^t)

    def state_dict(self) -> dict[str, Any]:
        """{"step": t, "exp_avg": {name: m}, "exp_avg_sq": {name: v}} (copies)."""
        return {"step": self.step_count,
                "exp_avg": {k: m.clone() for k, m in self.exp_avg.items()},
                "exp_avg_sq": {k: v.clone() for k, v in self.exp_avg_sq.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        step = self._check_step(state_dict)
        exp_avg = _check_buffers("exp_avg", state_dict.get("exp_avg", {}), self.params)
        exp_avg_sq = _check_buffers("exp_avg_sq", state_dict.get("exp_avg_sq", {}), self.params)
        if set(exp_avg) != set(exp_avg_sq):
            raise ValueError("state_dict: 'exp_avg' and 'exp_avg_sq' must have the same keys")
        self.step_count, self.exp_avg, self.exp_avg_sq = step, exp_avg, exp_avg_sq


class AdamW(Adam):
    """Adam with decoupled weight decay θ ← θ - lr λ θ before each Adam step.

    AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2).
    """

    decoupled = True

    def __init__(self, params: dict[str, Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


@torch.no_grad()
def clip_grad_norm(grads: dict[str, Tensor], max_norm: float) -> Tensor:
    """Scale every gradient in place so that their global L2 norm is at most ``max_norm``.

        N = √(Σ_k ‖g_k‖²);   c = min(1, max_norm / (N + 1e-6));   g_k ← c g_k

    (``torch.nn.utils.clip_grad_norm_``'s formula). Returns N, the norm before
    clipping, as a 0-d tensor; c is applied unconditionally so that no value is
    read back from the device.
    """
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads: expected a dict of names to tensors, "
                        f"got {type(grads).__name__}")
    max_norm = _check_hyper("max_norm", max_norm)
    dtype = None
    for name, g in grads.items():
        check_float_tensor(f"grads[{name!r}]", g, dtype=dtype)
        dtype = g.dtype
    if not grads:
        return torch.tensor(0.0)
    total_norm = torch.sqrt(sum(torch.sum(g * g) for g in grads.values()))
    coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
    for g in grads.values():
        g.mul_(coef)
    return total_norm


def _check_step_arg(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return value


def cosine_schedule(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                    min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``.

        lr = base_lr (step + 1) / warmup_steps                             step < warmup_steps
        lr = base_lr - (base_lr - min_lr) (1 - cos(π p)) / 2,
             p = (step - warmup_steps) / (total_steps - warmup_steps)    step < total_steps
        lr = min_lr                                                        otherwise

    Written as base_lr minus the decay so that the first decay step is base_lr exactly.
    """
    step = _check_step_arg("step", step)
    warmup_steps = _check_step_arg("warmup_steps", warmup_steps)
    total_steps = _check_step_arg("total_steps", total_steps)
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps: expected >= warmup_steps = {warmup_steps}, "
                         f"got {total_steps}")
    base_lr = _check_hyper("base_lr", base_lr)
    min_lr = _check_hyper("min_lr", min_lr)
    if min_lr > base_lr:
        raise ValueError(f"min_lr: expected <= base_lr = {base_lr}, got {min_lr}")
    if step < warmup_steps:
        # The fraction first, so that its last value is 1.0 and the peak is base_lr exactly.
        return base_lr * ((step + 1) / warmup_steps)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    # Rounding could land a hair under min_lr near the end; the schedule never goes below it.
    return max(min_lr, base_lr - (base_lr - min_lr) * 0.5 * (1.0 - math.cos(math.pi * progress)))
