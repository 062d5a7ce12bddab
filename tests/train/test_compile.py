"""`train.compile`: the compiled decoder layers give the unfused path's loss and LoRA gradients.

Tolerance (fp32): rtol 1e-4, atol 1e-5 — inductor reorders the reductions (RMSNorm's mean, the MLP's sums), which
moves results by a few float32 ulps per op; any real error (a missing term, a wrong scale) is orders larger.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab.data.masking import IGNORE_INDEX as IGNORE
from tunelab.train.batching import pack
from tunelab.train.compile import compile_decoder_layers
from tunelab.train.loss import masked_lm_loss
from tunelab.train.packed_attention import register


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        out.append((ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
    return out


def _lora_model(model):
    from peft import LoraConfig, get_peft_model

    model.config._attn_implementation = register()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def _loss_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = masked_lm_loss(model, batch, chunk_tokens=16)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


@pytest.mark.slow
def test_compiled_layers_match_the_unfused_path_over_changing_packed_shapes(tiny_llama):
    import torch._dynamo

    torch._dynamo.reset()
    eager = _lora_model(tiny_llama)
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled) == 2 * 3  # 2 layers x (2 norms + MLP)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step, lengths in enumerate([(7, 12, 5), (9, 4), (20, 3, 6, 2), (11,)]):
        batch = pack(_examples(lengths, seed=step))
        loss_e, grads_e = _loss_and_grads(eager, batch)
        loss_c, grads_c = _loss_and_grads(compiled, batch)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        assert len(grads_c) == len(grads_e) == 2 * 7 * 2  # every LoRA A and B
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before
    # Four token counts, three parts: a static compile and one dynamic recompile per part at most, not one per step.
    assert 2 <= graphs <= 2 * 3  # at least the norm and the MLP were really compiled
