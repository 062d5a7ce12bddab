"""`tunelab bench infer --quants`: the quantisation table on a tiny exported model, its perplexity column against
transformers' own perplexity of the same model on the same tokens, and its bandwidth bound."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.mark.slow
def test_quant_table_on_a_tiny_merged_model(tiny_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunelab.bench import quants as q
    from tunelab.export.merge import merge_run

    merged = tiny_run / "export" / "merged"
    if not merged.is_dir():
        merge_run(tiny_run, merged)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (40, 64, 25)]
    monkeypatch.setattr(q, "val_sequences", lambda run, limit: sequences)
    from tunelab.bench import bandwidth

    monkeypatch.setattr(bandwidth, "copy_bandwidth_gb_s", lambda threads: 10.0)
    report = q.quant_table(tiny_run, ["q8_0", "q4_0"], threads=1, max_new_tokens=8, repeats=1, log=lambda *_: None)

    rows = {r["quant"]: r for r in report["quants"]}
    assert set(rows) == {"q8_0", "q4_0"}
    assert rows["q4_0"]["size_mib"] < rows["q8_0"]["size_mib"]
    for row in rows.values():
        size = (tiny_run / "export" / f"model-{row['quant']}.gguf").stat().st_size
        assert row["bandwidth_bound_tok_s"] == pytest.approx(10e9 / size, rel=1e-3)
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0
    # Independent reference: the merged fp32 model's perplexity on the same tokens, computed by transformers.
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for seq in sequences:
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(seq) - 1
    assert rows["q8_0"]["ppl"] == pytest.approx(math.exp(nll / count), rel=0.02)  # q8_0 ~ the fp32 model
    assert rows["q8_0"]["ppl_vs_q8_0_pct"] == 0.0
    assert report["recommended"]["quant"] in rows
