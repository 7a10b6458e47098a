"""torch.compile(model, fullgraph=True) on the three model families (RNNLM, Seq2Seq, GPT):
no graph break, the fused ``seqtwin::`` ops in the compiled forward and backward graphs, and
logits, loss and every parameter gradient equal to eager's within the float32 budget.

The compiled models run with ``backend="aot_eager"``: it traces what inductor would (dynamo's
graph, the ops' fakes, AOT autograd's joint forward/backward with the registered backwards and
the hand-written autograd Functions) without a C++ build, which costs ~40-50 s per model on
this CPU. Inductor was checked by hand on the GPT and the LSTM RNNLM below in float64: fullgraph,
loss and gradients within 6e-17 of eager.

What compiling needed: validation that reads tensor values (lengths in range, finite inputs,
target ids, teacher_mask column 0) is skipped while compiling (``torch.compiler
.is_compiling()``), the recurrent layers mask whenever lengths are given instead of deciding
from ``lengths.min()``, and a Seq2Seq given a teacher_mask takes the step-by-step decoder
instead of deciding from ``teacher_mask.all()``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

import torch_impl as tim
from parity_tests.parity import assert_close
from parity_tests.tolerances import TORCH32_VS_REF64
from torch_impl.kernels import kernel_path

# the recording backend hands AOT autograd unboxed graph callables, which only costs a warning
pytestmark = pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")


def compile_fullgraph(model: torch.nn.Module) -> tuple[torch.nn.Module, AotEagerAndRecordGraphs]:
    """The model compiled with fullgraph=True (a graph break raises), and the recorded graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = AotEagerAndRecordGraphs()
    return torch.compile(model, fullgraph=True, backend=backend), backend


def run(model: torch.nn.Module, params: torch.nn.Module, *args, **kwargs
        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(outputs: logits and loss, gradients of the loss keyed by parameter name)."""
    params.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    logits, loss = out[0], out[1]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in params.named_parameters()}
    return {"logits": logits.detach(), "loss": loss.detach()}, grads


def assert_compiled_matches_eager(model: torch.nn.Module, ops: tuple[str, ...], *args,
                                  **kwargs) -> None:
    expected, expected_grads = run(model, model, *args, **kwargs)
    compiled, graphs = compile_fullgraph(model)
    outputs, grads = run(compiled, model, *args, **kwargs)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(graphs.graphs) == 1, f"{len(graphs.graphs)} graphs"
    targets = [str(node.target) for phase in (graphs.fw_graphs, graphs.bw_graphs)
               for gm in phase for node in gm.graph.nodes]
    # a time loop writing rows into one buffer becomes a whole-buffer copy per step under
    # functionalization (O(T²) traffic wherever the backend does not re-inplace it)
    scatters = [t for t in targets if "select_scatter" in t or "slice_scatter" in t]
    assert not scatters, f"{len(scatters)} scatter copies in the compiled graphs: {scatters[:3]}"
    for op in ops:
        for suffix in ("", "_backward"):
            assert any(f"seqtwin.{op}{suffix}." in t for t in targets), f"{op}{suffix} not traced"
    for name, value in outputs.items():
        assert_close(value, expected[name], TORCH32_VS_REF64.forward, name)
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], TORCH32_VS_REF64.gradient, f"d{name}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_rnnlm_with_lengths_and_dropout_compiles_fullgraph_and_matches_eager(cell: str,
                                                                             path: str) -> None:
    """On the native path each layer direction is one seqtwin::recurrent_layer node (forward
    and backward); on the torch path the unrolled loop calls the fused step op."""
    op = "recurrent_layer" if path == "native" else f"{cell}_step"
    with kernel_path(path):
        _check_rnnlm_compiles(cell, op)


def _check_rnnlm_compiles(cell: str, op: str) -> None:
    torch.manual_seed(0)
    B, T, V, E, H, L = 3, 5, 11, 4, 6, 2
    model = tim.RNNLM(V, E, H, num_layers=L, cell=cell, dropout=0.25).train()
    ids, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    lengths = torch.tensor([5, 2, 4])

    def keep(size: int) -> torch.Tensor:
        return torch.rand(B, T, size) < 0.75
    masks = {"embedding": keep(E), "rnn": [keep(H) for _ in range(L - 1)], "output": keep(H)}
    assert_compiled_matches_eager(model, (op, "cross_entropy"), ids, targets, lengths=lengths,
                                  dropout_masks=masks)


# the encoder's layers and the decoder's recurrence (a whole layer for Luong attention, one
# step at a time for Bahdanau's) run the whole-layer native op
@pytest.mark.parametrize("cell, attention, ops", [("gru", "general", ("recurrent_layer",)),
                                                  ("lstm", "bahdanau", ("recurrent_layer",))])
def test_seq2seq_with_attention_compiles_fullgraph_and_matches_eager(cell: str, attention: str,
                                                                     ops: tuple) -> None:
    torch.manual_seed(0)
    config = tim.Seq2SeqConfig(src_vocab=9, tgt_vocab=8, embed_size=4, hidden_size=5,
                               cell=cell, attention=attention, bidirectional=True)
    model = tim.Seq2Seq(config)
    src, src_lengths = torch.randint(1, 9, (2, 5)), torch.tensor([5, 3])
    tgt_in, targets = torch.randint(1, 8, (2, 4)), torch.tensor([[3, 1, 0, 0], [2, 5, 7, 1]])
    # Seq2Seq's loss runs inside its hand-written Seq2SeqFunction: cross_entropy's forward
    # and backward ops are both traced there
    assert_compiled_matches_eager(model, (*ops, "cross_entropy"), src, src_lengths, tgt_in,
                                  targets)


def test_seq2seq_with_a_teacher_mask_compiles_fullgraph_and_matches_eager() -> None:
    torch.manual_seed(0)
    config = tim.Seq2SeqConfig(src_vocab=9, tgt_vocab=8, embed_size=4, hidden_size=5,
                               cell="lstm", attention="dot")
    model = tim.Seq2Seq(config)
    src, tgt_in = torch.randint(1, 9, (2, 5)), torch.randint(1, 8, (2, 4))
    teacher_mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
    assert_compiled_matches_eager(model, ("recurrent_layer", "cross_entropy"), src, None,
                                  tgt_in, torch.randint(0, 8, (2, 4)), teacher_mask=teacher_mask)


def test_gpt_compiles_fullgraph_and_matches_eager() -> None:
    torch.manual_seed(0)
    config = tim.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = tim.GPT(config)
    ids, targets = torch.randint(0, 13, (2, 6)), torch.randint(0, 13, (2, 6))
    targets[1, -2:] = -100
    assert_compiled_matches_eager(model, ("layer_norm", "cross_entropy"), ids, targets)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_compiled_rnnlm_serves_several_sequence_lengths(cell: str) -> None:
    """A second sequence length recompiles (the time loop is unrolled per T, and dynamo marks
    T dynamic on the second call): with fullgraph=True nothing in the layers may need T as a
    concrete int until the loop. An eagerly built error message once did (str of a symbolic
    size) and failed the second call. Each length matches eager in loss and gradients."""
    torch.manual_seed(0)
    B, V, E, H = 3, 11, 4, 6
    model = tim.RNNLM(V, E, H, num_layers=2, cell=cell)
    compiled, _ = compile_fullgraph(model)
    for T in (3, 5, 6):
        ids, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
        lengths = torch.tensor([T, 2, T - 1])
        expected, expected_grads = run(model, model, ids, targets, lengths=lengths)
        outputs, grads = run(compiled, model, ids, targets, lengths=lengths)
        assert not torch._dynamo.utils.counters["graph_break"]
        assert_close(outputs["loss"], expected["loss"], TORCH32_VS_REF64.forward, f"loss T={T}")
        for name, grad in grads.items():
            assert_close(grad, expected_grads[name], TORCH32_VS_REF64.gradient, f"d{name} T={T}")
