"""The training loop's memory tricks change no numbers: SwiGLU gradients equal autograd's."""

from __future__ import annotations

import torch

from tests.conftest import build_tiny_llama
from tunelab.train.memory import SwiGLU, lean_swiglu


def test_swiglu_matches_autograd():
    torch.manual_seed(0)
    gate, up = torch.randn(5, 7, dtype=torch.float64, requires_grad=True), torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))


def test_lean_swiglu_keeps_model_outputs_and_gradients():
    ids = torch.randint(0, 256, (1, 12))
    grads = []
    for patch in (False, True):
        model = build_tiny_llama()
        if patch:
            lean_swiglu(model)
        assert all(("forward" in vars(m)) == patch for m in model.modules() if type(m).__name__ == "LlamaMLP")
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
