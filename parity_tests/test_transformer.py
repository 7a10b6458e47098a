"""Parity properties of GPT: reference/transformer.py and torch_impl/transformer.py.

Gradients are those of L = dloss · loss + <logits, dlogits> for every parameter tensor, with a
random dlogits (or none) and targets partly ignored. The torch_impl ``GPT`` module (autograd
through the attention, layer-norm, gelu and loss Functions) and the explicit-cache
``gpt_forward``/``gpt_backward`` are both held to the reference; the reference is held to central
differences and to Hugging Face's ``GPT2LMHeadModel`` with the same weights.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given

import reference.transformer as ref
import torch_impl.attention as tim_attention
import torch_impl.transformer as tim
from reference.gradcheck import numerical_gradients

from .parity import assert_all_close, assert_close, relative_error, to_numpy
from .strategies import (
    GPTCase,
    GPTInputs,
    float32_exact,
    gpt_cases,
    hf_gpt_cases,
    make_gpt_inputs,
    tiny_gpt_cases,
    to_torch,
)
from .tolerances import REF_VS_FINITE_DIFF, TORCH32_VS_REF64, TORCH64_VS_REF64, TORCHNN64_VS_OURS64

# Edge cases every property also runs.
ONE_TOKEN = GPTCase(vocab_size=3, block_size=1, n_layer=1, n_head=1, n_embd=4, batch=1, steps=1,
                    seed=1)
ALL_IGNORED = GPTCase(vocab_size=5, block_size=4, n_layer=2, n_head=2, n_embd=4, batch=2,
                      steps=3, ignored=1.0, dlogits=False, seed=2)
DROPOUT_NO_BIAS = GPTCase(vocab_size=6, block_size=5, n_layer=2, n_head=2, n_embd=8, batch=2,
                          steps=4, bias=False, dropout=0.4, ignored=0.3, seed=3)
IGNORE_A_CLASS = GPTCase(vocab_size=4, block_size=6, n_layer=1, n_head=4, n_embd=8, batch=3,
                         steps=6, ignored=0.5, ignore_index=0, dlogits=False, seed=4)
LOGITS_ONLY = GPTCase(vocab_size=7, block_size=3, n_layer=1, n_head=2, n_embd=6, batch=2,
                      steps=3, targets=False, seed=5)


class GPTRun(NamedTuple):
    logits: object
    loss: object          # None without targets
    grads: dict


def run_reference(inputs: GPTInputs) -> GPTRun:
    case = inputs.case
    (logits, loss), cache = ref.gpt_forward(inputs.ids, inputs.params, case.reference_config(),
                                            inputs.targets, case.ignore_index,
                                            inputs.dropout_masks)
    return GPTRun(logits, loss, ref.gpt_backward(cache, inputs.dlogits, inputs.dloss))


def _torch_args(inputs: GPTInputs, dtype: torch.dtype) -> dict:
    masks = inputs.dropout_masks
    return dict(params={k: to_torch(v, dtype) for k, v in inputs.params.items()},
                ids=to_torch(inputs.ids),
                targets=None if inputs.targets is None else to_torch(inputs.targets),
                masks=None if masks is None else {k: to_torch(m) for k, m in masks.items()},
                dlogits=None if inputs.dlogits is None else to_torch(inputs.dlogits, dtype))


def run_torch_impl_functional(inputs: GPTInputs, dtype: torch.dtype) -> GPTRun:
    case, a = inputs.case, _torch_args(inputs, dtype)
    (logits, loss), cache = tim.gpt_forward(a["ids"], a["params"], case.torch_impl_config(),
                                            a["targets"], case.ignore_index, a["masks"])
    return GPTRun(logits, loss, tim.gpt_backward(cache, a["dlogits"], inputs.dloss))


def run_torch_impl_module(inputs: GPTInputs, dtype: torch.dtype) -> GPTRun:
    case, a = inputs.case, _torch_args(inputs, dtype)
    model = tim.GPT(case.torch_impl_config(), dtype=dtype)
    model.load_state_dict(a["params"])
    logits, loss = model(a["ids"], a["targets"], case.ignore_index, dropout_masks=a["masks"])
    outputs, upstream = [], []
    if loss is not None:
        outputs.append(loss)
        upstream.append(torch.tensor(inputs.dloss, dtype=dtype))
    if a["dlogits"] is not None:
        outputs.append(logits)
        upstream.append(a["dlogits"])
    torch.autograd.backward(outputs, upstream)
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p)
             for name, p in model.named_parameters()}
    return GPTRun(logits.detach(), None if loss is None else loss.detach(), grads)


def assert_runs_close(actual: GPTRun, expected: GPTRun, budget) -> None:
    assert_close(actual.logits, expected.logits, budget.forward, "logits")
    assert (actual.loss is None) == (expected.loss is None)
    if expected.loss is not None:
        assert_close(actual.loss, expected.loss, budget.forward, "loss")
    assert_all_close(actual.grads, expected.grads, budget.gradient, "d")


def float32_inputs(inputs: GPTInputs) -> GPTInputs:
    """Inputs rounded to float32 (held in float64) so that only the arithmetic differs."""
    return inputs._replace(
        params={k: float32_exact(v) for k, v in inputs.params.items()},
        dlogits=None if inputs.dlogits is None else float32_exact(inputs.dlogits),
        dloss=float(np.float32(inputs.dloss)))


# ----------------------------------------------------------------------------- reference

@given(case=tiny_gpt_cases())
@example(case=ONE_TOKEN)
@example(case=ALL_IGNORED)
@example(case=DROPOUT_NO_BIAS._replace(steps=3, block_size=3, vocab_size=4))
@example(case=LOGITS_ONLY)
def test_reference_backward_matches_finite_differences(case: GPTCase) -> None:
    # Central differences on 3 sampled elements of every parameter tensor (all of them would
    # take 2 forwards per element, ~1000 per example). The error is over all the samples
    # together: a sampled element can have a true gradient of exactly 0 (the key bias: softmax
    # ignores a shift common to a row), where a per-tensor relative error is rounding / 0.
    inputs = make_gpt_inputs(case)
    run = run_reference(inputs)
    rng = np.random.default_rng(case.seed)
    picks = {name: rng.choice(p.size, size=min(3, p.size), replace=False)
             for name, p in inputs.params.items()}

    def model(**sampled: np.ndarray) -> tuple:
        params = {name: p.copy() for name, p in inputs.params.items()}
        for name, values in sampled.items():
            params[name].flat[picks[name]] = values
        (logits, loss), _ = ref.gpt_forward(inputs.ids, params, case.reference_config(),
                                            inputs.targets, case.ignore_index,
                                            inputs.dropout_masks)
        return logits, loss

    wrt = {name: p.flat[picks[name]] for name, p in inputs.params.items()}
    dloss = None if run.loss is None else np.asarray(inputs.dloss)
    numeric = numerical_gradients(model, wrt, (inputs.dlogits, dloss))
    analytic = {name: g.flat[picks[name]] for name, g in run.grads.items()}
    names = list(wrt)
    a = np.concatenate([analytic[name] for name in names])
    n = np.concatenate([numeric[name] for name in names])
    error = relative_error(a, n)
    if not error <= REF_VS_FINITE_DIFF:
        worst = max(names, key=lambda name: np.abs(analytic[name] - numeric[name]).max())
        raise AssertionError(f"sampled gradients: relative error {error:.3e} > "
                             f"{REF_VS_FINITE_DIFF:.1e}; worst tensor {worst!r} at flat indices "
                             f"{picks[worst]}: analytic {analytic[worst]}, numeric "
                             f"{numeric[worst]}")


@given(case=hf_gpt_cases())
@example(case=ONE_TOKEN)
@example(case=IGNORE_A_CLASS._replace(ignore_index=-100))
def test_reference_matches_transformers_gpt2_logits_and_loss(case: GPTCase) -> None:
    transformers = pytest.importorskip("transformers")
    inputs = make_gpt_inputs(case)
    hf = hf_model(transformers, case).double()
    missing, unexpected = hf.load_state_dict(
        {k: torch.from_numpy(v) for k, v in inputs.params.items()}, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the tied head follows wte
    # transformers shifts its labels by one: labels = ids makes its targets ids[:, 1:].
    targets = np.concatenate([inputs.ids[:, 1:], np.full((case.batch, 1), -100)], axis=1)
    (logits, loss), _ = ref.gpt_forward(inputs.ids, inputs.params, case.reference_config(),
                                        targets)
    with torch.no_grad():
        out = hf(input_ids=to_torch(inputs.ids), labels=to_torch(inputs.ids))
    assert_close(logits, out.logits, TORCHNN64_VS_OURS64.forward, "logits")
    if case.steps > 1:  # with one token transformers' loss has no target: nan
        # transformers' ForCausalLMLoss casts the logits to float32 (loss_utils.py:
        # logits.float()), so its loss of a float64 model is a float32 result.
        assert_close(loss, out.loss, TORCH32_VS_REF64.forward, "loss")


def hf_model(transformers, case: GPTCase):
    """A GPT2LMHeadModel of the case's sizes, eager attention, no dropout."""
    config = transformers.GPT2Config(
        vocab_size=case.vocab_size, n_positions=case.block_size, n_embd=case.n_embd,
        n_layer=case.n_layer, n_head=case.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        loss_type="ForCausalLM", attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("backend", ["reference", "torch_impl"])
def test_transformers_state_dict_loads_with_no_renaming(backend: str) -> None:
    transformers = pytest.importorskip("transformers")
    case = GPTCase(vocab_size=9, block_size=5, n_layer=2, n_head=2, n_embd=8, batch=2, steps=5,
                   seed=6)
    torch.manual_seed(0)
    hf = hf_model(transformers, case).double()
    with torch.no_grad():  # GPT-2's init has zero biases and unit LN weights: make them count
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = hf.state_dict()  # with lm_head.weight, tied to wte
    ids = make_gpt_inputs(case).ids
    if backend == "reference":
        model = ref.GPT(case.reference_config())
        model.load_state_dict(state)
        logits, _ = model(ids)
    else:
        model = tim.GPT(case.torch_impl_config(), dtype=torch.float64)
        model.load_state_dict(state)
        logits, _ = model(to_torch(ids))
    with torch.no_grad():
        expected = hf(input_ids=to_torch(ids)).logits
    assert_close(logits, expected, TORCHNN64_VS_OURS64.forward, "logits")


@pytest.mark.parametrize("backend", ["reference", "torch_impl"])
def test_load_state_dict_rejects_an_untied_lm_head(backend: str) -> None:
    case = ONE_TOKEN
    if backend == "reference":
        model = ref.GPT(case.reference_config())
        state = model.state_dict()
        state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    else:
        model = tim.GPT(case.torch_impl_config())
        state = model.state_dict()
        state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    with pytest.raises(ValueError, match=r"^state_dict\['lm_head.weight'\]: must equal"):
        model.load_state_dict(state)


# ----------------------------------------------------------------------------- torch_impl

@given(case=gpt_cases())
@example(case=ONE_TOKEN)
@example(case=ALL_IGNORED)
@example(case=DROPOUT_NO_BIAS)
@example(case=IGNORE_A_CLASS)
@example(case=LOGITS_ONLY)
def test_torch_impl_float64_matches_reference(case: GPTCase) -> None:
    inputs = make_gpt_inputs(case)
    expected = run_reference(inputs)
    assert_runs_close(run_torch_impl_functional(inputs, torch.float64), expected,
                      TORCH64_VS_REF64)
    assert_runs_close(run_torch_impl_module(inputs, torch.float64), expected, TORCH64_VS_REF64)


@given(case=gpt_cases())
@example(case=ONE_TOKEN)
@example(case=DROPOUT_NO_BIAS)
@example(case=IGNORE_A_CLASS)
def test_torch_impl_float32_matches_reference_float64(case: GPTCase) -> None:
    inputs = float32_inputs(make_gpt_inputs(case))
    expected = run_reference(inputs)
    for run in (run_torch_impl_functional(inputs, torch.float32),
                run_torch_impl_module(inputs, torch.float32)):
        assert run.logits.dtype == torch.float32
        assert all(g.dtype == torch.float32 for g in run.grads.values())
        assert_runs_close(run, expected, TORCH32_VS_REF64)


# ----------------------------------------------------------------------------- properties

BACKENDS = pytest.mark.parametrize("backend", ["reference", "torch_impl"])


def forward_logits_and_loss(backend: str, inputs: GPTInputs, ids: np.ndarray,
                            targets: np.ndarray | None, ignore_index: int = -100):
    case = inputs.case
    if backend == "reference":
        (logits, loss), cache = ref.gpt_forward(ids, inputs.params, case.reference_config(),
                                                targets, ignore_index, inputs.dropout_masks)
        return logits, loss, ref.gpt_backward(cache)
    a = _torch_args(inputs, torch.float64)
    (logits, loss), cache = tim.gpt_forward(to_torch(ids), a["params"], case.torch_impl_config(),
                                            None if targets is None else to_torch(targets),
                                            ignore_index, a["masks"])
    grads = {k: to_numpy(g) for k, g in tim.gpt_backward(cache).items()}
    return to_numpy(logits), None if loss is None else to_numpy(loss), grads


@BACKENDS
@given(case=gpt_cases())
@example(case=ONE_TOKEN._replace(steps=1))
@example(case=DROPOUT_NO_BIAS)
def test_changing_a_token_never_changes_earlier_logits(backend: str, case: GPTCase) -> None:
    inputs = make_gpt_inputs(case._replace(targets=False))
    rng = np.random.default_rng(case.seed + 1)
    t = int(rng.integers(0, case.steps))
    changed = inputs.ids.copy()
    changed[:, t] = (changed[:, t] + 1 + rng.integers(0, case.vocab_size - 1)) % case.vocab_size
    before, _, _ = forward_logits_and_loss(backend, inputs, inputs.ids, None)
    after, _, _ = forward_logits_and_loss(backend, inputs, changed, None)
    # Exactly: a masked key gets weight exactly 0, so nothing of token t reaches position < t.
    np.testing.assert_array_equal(after[:, :t], before[:, :t])
    if case.dropout == 0:  # (a dropout mask may drop all of token t's embedding)
        assert not np.array_equal(after[:, t], before[:, t])


@BACKENDS
@given(case=gpt_cases())
@example(case=IGNORE_A_CLASS)
def test_ignore_index_is_the_same_as_dropping_those_targets(backend: str, case: GPTCase) -> None:
    # ignore_index may be a real class (0): its targets then carry no loss, as -100 ones do.
    inputs = make_gpt_inputs(case._replace(targets=True, ignore_index=0, ignored=0.0))
    targets = inputs.targets
    _, loss, grads = forward_logits_and_loss(backend, inputs, inputs.ids, targets, 0)
    _, loss_100, grads_100 = forward_logits_and_loss(backend, inputs, inputs.ids,
                                                     np.where(targets == 0, -100, targets))
    assert_close(loss, loss_100, TORCH64_VS_REF64.forward, "loss")
    assert_all_close(grads, grads_100, TORCH64_VS_REF64.gradient, "d")
    valid = targets != 0
    per_target = -np.log(_softmax(forward_logits_and_loss(backend, inputs, inputs.ids, None)[0]))
    picked = np.take_along_axis(per_target, targets[..., None], axis=-1)[..., 0]
    expected = picked[valid].mean() if valid.any() else 0.0
    assert_close(loss, expected, TORCH64_VS_REF64.forward, "loss")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@BACKENDS
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(backend: str) -> None:
    inputs = make_gpt_inputs(ALL_IGNORED)
    _, loss, grads = forward_logits_and_loss(backend, inputs, inputs.ids, inputs.targets)
    assert float(loss) == 0.0
    assert all(not np.any(g) for g in grads.values())


@BACKENDS
def test_eval_mode_turns_dropout_off(backend: str) -> None:
    case = DROPOUT_NO_BIAS
    inputs = make_gpt_inputs(case)
    no_dropout = make_gpt_inputs(case._replace(dropout=0.0))
    expected, _, _ = forward_logits_and_loss(backend, no_dropout, inputs.ids, None)
    if backend == "reference":
        model = ref.GPT(case.reference_config(), seed=0)
        model.load_state_dict(inputs.params)
        train_logits, _ = model(inputs.ids)
        eval_logits, _ = model.eval()(inputs.ids)
    else:
        model = tim.GPT(case.torch_impl_config(), dtype=torch.float64)
        model.load_state_dict({k: to_torch(v) for k, v in inputs.params.items()})
        train_logits, _ = model(to_torch(inputs.ids))
        model.eval()
        eval_logits, _ = model(to_torch(inputs.ids))
    assert_close(eval_logits, expected, TORCH64_VS_REF64.forward, "eval logits")
    assert not np.allclose(to_numpy(train_logits), expected)  # masks drawn in training mode


@BACKENDS
def test_init_is_gpt2s(backend: str) -> None:
    config = dict(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_embd=64)
    if backend == "reference":
        params = ref.GPT(ref.GPTConfig(**config), seed=0).params
    else:
        torch.manual_seed(0)
        params = dict(tim.GPT(tim.GPTConfig(**config), dtype=torch.float64).named_parameters())
    params = {k: to_numpy(v) for k, v in params.items()}
    assert list(params) == list(ref.gpt_param_shapes(ref.GPTConfig(**config)))
    for name, p in params.items():
        if ".ln_" in name and name.endswith(".weight"):
            assert np.all(p == 1.0), name
        elif name.endswith(".bias"):
            assert np.all(p == 0.0), name
        else:
            std = 0.02 / np.sqrt(2 * 2) if ".c_proj." in name else 0.02
            assert abs(p.std() / std - 1) < 0.1 and abs(p.mean()) < 0.2 * std, name


@BACKENDS
def test_model_class_matches_the_functional_pair(backend: str) -> None:
    # The reference GPT's forward/backward and the torch_impl module's autograd give the
    # functional gradients; the loss scale dloss and dlogits enter as documented.
    inputs = make_gpt_inputs(DROPOUT_NO_BIAS)
    expected = run_reference(inputs)
    if backend == "reference":
        model = ref.GPT(DROPOUT_NO_BIAS.reference_config())
        model.load_state_dict(inputs.params)
        logits, loss = model(inputs.ids, inputs.targets, dropout_masks=inputs.dropout_masks)
        model.backward(inputs.dloss, inputs.dlogits)
        run = GPTRun(logits, loss, model.grads)
    else:
        run = run_torch_impl_module(inputs, torch.float64)
    assert_runs_close(run, expected, TORCH64_VS_REF64)


# ----------------------------------------------------------------------------- bad input

def _call(backend: str, ids, params=None, config=None, targets=None, masks=None, **kwargs):
    case = DROPOUT_NO_BIAS._replace(dropout=0.0, bias=True)
    inputs = make_gpt_inputs(case)
    params = inputs.params if params is None else params
    if backend == "reference":
        return ref.gpt_forward(ids, params, config or case.reference_config(), targets,
                               dropout_masks=masks, **kwargs)
    if isinstance(params, dict):
        params = {k: to_torch(v) for k, v in params.items()}
    config = config or case.torch_impl_config()
    masks = None if masks is None else {k: to_torch(m) for k, m in masks.items()}
    return tim.gpt_forward(to_torch(ids), params, config,
                           None if targets is None else to_torch(targets), dropout_masks=masks,
                           **kwargs)


def _params(**changes) -> dict:
    params = dict(make_gpt_inputs(DROPOUT_NO_BIAS._replace(dropout=0.0, bias=True)).params)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del params[name]
        else:
            params[name] = value
    return params


IDS = np.zeros((2, 3), np.int64)


@BACKENDS
@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(ids=np.array([[0, 6, 1]])), ValueError, r"^ids: values must be < 6, got 6"),
    (dict(ids=np.array([[0, -1, 1]])), ValueError, r"^ids: values must be >= 0, got -1"),
    (dict(ids=np.zeros((1, 6), np.int64)), ValueError,
     r"^ids: expected shape \(B, T\) with B >= 1 and 1 <= T <= 5 \(config.block_size\), "
     r"got \(1, 6\)"),
    (dict(ids=np.zeros((2, 0), np.int64)), ValueError, r"^ids: expected shape \(B, T\)"),
    (dict(ids=np.zeros(3, np.int64)), ValueError, r"^ids: expected shape \(B, T\), got \(3,\)"),
    (dict(ids=np.zeros((2, 3))), TypeError, r"^ids: expected an integer dtype"),
    (dict(ids=IDS, targets=np.zeros((2, 3))), TypeError, r"^targets: expected an integer dtype"),
    (dict(ids=IDS, targets=np.zeros((2, 2), np.int64)), ValueError,
     r"^targets: expected shape \(2, 3\), got \(2, 2\)"),
    (dict(ids=IDS, targets=np.full((2, 3), 6)), ValueError, r"^targets: values must be in 0\.\.5"),
    (dict(ids=IDS, params=_params(transformer__h__1__ln_2__bias=None)), ValueError,
     r"^params: missing key 'transformer.h.1.ln_2.bias' \(expected shape \(8,\)\)"),
    (dict(ids=IDS, params=_params(lm_head__weight=np.zeros((6, 8)))), ValueError,
     r"^params: unexpected keys \['lm_head.weight'\]"),
    (dict(ids=IDS, params=_params(transformer__wpe__weight=np.zeros((4, 8)))), ValueError,
     r"^params\['transformer.wpe.weight'\]: expected shape \(5, 8\), got \(4, 8\)"),
    (dict(ids=IDS, params=_params(transformer__h__0__attn__c_attn__weight=np.zeros((24, 8)))),
     ValueError, r"^params\['transformer.h.0.attn.c_attn.weight'\]: expected shape \(8, 24\)"),
    (dict(ids=IDS, params=_params(transformer__ln_f__weight=np.ones(8, np.float32))), TypeError,
     r"^params\['transformer.ln_f.weight'\]: expected dtype"),
    (dict(ids=IDS, params=_params(transformer__wte__weight=np.full((6, 8), np.nan))), ValueError,
     r"^params\['transformer.wte.weight'\]: contains NaN"),
    (dict(ids=IDS, params="weights"), TypeError, r"^params: expected a dict"),
    (dict(ids=IDS, config=dict(vocab_size=6)), TypeError, r"^config: expected a GPTConfig"),
    (dict(ids=IDS, masks={"transformer.drop": np.ones((2, 3, 8), bool)}), ValueError,
     r"^dropout_masks: expected None when config.dropout == 0"),
], ids=["id-too-large", "id-negative", "T-above-block-size", "T-zero", "1d-ids", "float-ids",
        "float-targets", "targets-shape", "target-too-large", "missing-param", "lm-head-param",
        "misshapen-wpe", "transposed-c-attn", "mixed-dtypes", "nan-param", "params-not-dict",
        "config-not-GPTConfig", "masks-without-dropout"])
def test_forward_rejects_bad_input_naming_the_argument(backend, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        _call(backend, **kwargs)


@BACKENDS
@pytest.mark.parametrize("masks, error, pattern", [
    (None, ValueError, r"^dropout_masks: required when config.dropout = 0.4 > 0"),
    ("drop-one", ValueError, r"^dropout_masks: expected the keys .* missing "
                             r"\['transformer.h.1.mlp.dropout'\]"),
    ("float", TypeError, r"^dropout_masks\['transformer.drop'\]: expected a bool"),
    ("misshapen", ValueError, r"^dropout_masks\['transformer.h.0.attn.attn_dropout'\]: "
                              r"expected shape \(2, 2, 4, 4\), got \(2, 4, 4\)"),
])
def test_forward_rejects_bad_dropout_masks_naming_them(backend, masks, error, pattern) -> None:
    inputs = make_gpt_inputs(DROPOUT_NO_BIAS)
    good = inputs.dropout_masks
    if masks == "drop-one":
        masks = {k: v for k, v in good.items() if k != "transformer.h.1.mlp.dropout"}
    elif masks == "float":
        masks = {**good, "transformer.drop": good["transformer.drop"].astype(np.float64)}
    elif masks == "misshapen":
        masks = {**good, "transformer.h.0.attn.attn_dropout": np.ones((2, 4, 4), bool)}
    with pytest.raises(error, match=pattern):
        if backend == "reference":
            ref.gpt_forward(inputs.ids, inputs.params, DROPOUT_NO_BIAS.reference_config(),
                            dropout_masks=masks)
        else:
            tim.gpt_forward(to_torch(inputs.ids),
                            {k: to_torch(v) for k, v in inputs.params.items()},
                            DROPOUT_NO_BIAS.torch_impl_config(),
                            dropout_masks=None if masks is None else
                            {k: to_torch(m) for k, m in masks.items()})


@BACKENDS
def test_backward_rejects_misshapen_dlogits_naming_it(backend) -> None:
    inputs = make_gpt_inputs(LOGITS_ONLY)
    if backend == "reference":
        _, cache = ref.gpt_forward(inputs.ids, inputs.params, LOGITS_ONLY.reference_config())
        dlogits, backward = np.ones((2, 3, 6)), ref.gpt_backward
    else:
        a = _torch_args(inputs, torch.float64)
        _, cache = tim.gpt_forward(a["ids"], a["params"], LOGITS_ONLY.torch_impl_config())
        dlogits, backward = torch.ones(2, 3, 6, dtype=torch.float64), tim.gpt_backward
    with pytest.raises(ValueError, match=r"^dlogits: expected shape \(2, 3, 7\), got \(2, 3, 6\)"):
        backward(cache, dlogits)


@BACKENDS
@pytest.mark.parametrize("changes, error, pattern", [
    (dict(n_head=3), ValueError, r"^n_head: expected a divisor of n_embd = 8, got 3"),
    (dict(n_layer=0), ValueError, r"^n_layer: expected a positive int, got 0"),
    (dict(vocab_size=5.0), TypeError, r"^vocab_size: expected a positive int"),
    (dict(dropout=1.0), ValueError, r"^dropout: expected a probability in \[0, 1\)"),
    (dict(layer_norm_epsilon=0.0), ValueError, r"^layer_norm_epsilon: expected a positive"),
    (dict(bias=1), TypeError, r"^bias: expected a bool"),
])
def test_config_rejects_bad_fields_naming_them(backend, changes, error, pattern) -> None:
    fields = {**dict(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=8), **changes}
    config_class = ref.GPTConfig if backend == "reference" else tim.GPTConfig
    with pytest.raises(error, match=pattern):
        config_class(**fields)


@BACKENDS
def test_model_rejects_out_of_range_ids_naming_them(backend) -> None:
    case = ONE_TOKEN._replace(block_size=2)
    if backend == "reference":
        model, convert = ref.GPT(case.reference_config()), np.asarray
    else:
        model, convert = tim.GPT(case.torch_impl_config()), torch.as_tensor
    with pytest.raises(ValueError, match=r"^ids: values must be < 3, got 3"):
        model(convert(np.array([[0, 3]])))
    with pytest.raises(ValueError, match=r"^ids: expected shape .* 1 <= T <= 2"):
        model(convert(np.zeros((1, 3), np.int64)))
    with pytest.raises(ValueError, match=r"^targets: values must be in 0\.\.2"):
        model(convert(np.zeros((1, 2), np.int64)), convert(np.array([[0, 5]])))


@BACKENDS
def test_model_rejects_nan_weights_naming_them(backend) -> None:
    case = ONE_TOKEN._replace(block_size=2)
    if backend == "reference":
        model, convert = ref.GPT(case.reference_config()), np.asarray
        model.params["transformer.h.0.mlp.c_fc.weight"][0, 1] = np.nan
    else:
        model, convert = tim.GPT(case.torch_impl_config()), torch.as_tensor
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^params\['transformer.h.0.mlp.c_fc.weight'\]: "
                                         r"contains NaN or inf \(first at index \(0, 1\)\)"):
        model(convert(np.array([[0, 1]])))
    # the step interface: where a decode starts (init_state, prefill), not once per token
    for start in (lambda: model.init_state(1), lambda: model.init_state(1, kv_cache=False),
                  lambda: model.prefill(convert(np.array([[0]])))):
        with pytest.raises(ValueError, match=r"^params\['transformer.h.0.mlp.c_fc.weight'\]"):
            start()


def test_gpt_validates_once_at_its_entry_and_its_blocks_trust_the_attention_inputs(
        monkeypatch) -> None:
    """The module, the functional pair and a decoder step check ids, masks and weights at the
    entry; their blocks call the attention op's internals, never the public, validating
    attention (whose NaN scans of q, k and v were three per block)."""
    def revalidated(*args, **kwargs):
        raise AssertionError("a GPT block went through the public attention's validation")

    monkeypatch.setattr(tim_attention, "check_attention_args", revalidated)
    inputs = make_gpt_inputs(DROPOUT_NO_BIAS)
    run_torch_impl_module(inputs, torch.float64)
    run_torch_impl_functional(inputs, torch.float64)
    model = tim.GPT(DROPOUT_NO_BIAS.torch_impl_config()).eval()
    _, state = model.prefill(torch.zeros(2, 2, dtype=torch.int64))
    model.step(torch.zeros(2, dtype=torch.int64), state)


def test_config_fields_are_the_same_in_both_backends() -> None:
    assert [f.name for f in dataclasses.fields(ref.GPTConfig)] == \
        [f.name for f in dataclasses.fields(tim.GPTConfig)]
