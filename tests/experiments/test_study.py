"""`tunelab sweep SWEEP.yaml` on a small model: table, plots, fixed held-out sets, skip and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import small_llama_folder
from tunelab.config import ConfigError


def _chats(path: Path, n: int = 48) -> Path:
    cities = ["Lisbon", "Paris", "Rome", "Oslo", "Cairo", "Lima", "Tokyo", "Quito"]
    with open(path, "w") as f:
        for i in range(n):
            city = cities[i % len(cities)]
            messages = [
                {"role": "user", "content": f"Plan {i % 3 + 1} days in {city}, trip number {i}."},
                {
                    "role": "assistant",
                    "content": f"Day 1: the old town of {city}. Day 2: a museum and the river ({i}).",
                },
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
            if i % 4 == 0:  # exact duplicates: the no-dedup run keeps them, so its own data differs from the others'
                f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def sweep_file(tmp_path):
    model = small_llama_folder(tmp_path)
    data = _chats(tmp_path / "chats.jsonl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Plan 2 days in Oslo.", "city": "Oslo", "days": 2}\n{"prompt": "Plan a day in Lima."}\n'
    )
    base = {
        "data": {"sources": [{"path": str(data)}], "val_fraction": 0.25, "dedup": {"near": False}},
        "model": {"name": str(model)},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "output_dir": str(tmp_path / "unused"),
            "max_steps": 4,
            "batch_size": 2,
            "warmup_steps": 0,
            "save_steps": 2,
            "eval_steps": 2,
            "precision": "fp32",
            "threads": 1,
            "max_seq_len": 128,
        },
        "eval": {"batch_size": 4},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "base": "base.yaml",
        "output": str(tmp_path / "sweep"),
        "grid": {"train.lr": [1.0e-3, 1.0e-2]},
        "runs": [{"name": "no-dedup", "set": {"data.dedup.exact": False}}],
        "heldout": {
            "general": [{"path": str(data)}],
            "travel": [{"path": str(data), "keywords": ["Oslo", "Lima"]}],
            "max_rows": 6,
        },
        "travel_eval": {"prompts": "prompts.jsonl", "limit": 2, "max_new_tokens": 6},
        "export": False,
    }
    path = tmp_path / "sweep-small.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
def test_sweep_file_table_plots_skip_and_resume(sweep_file, tmp_path, monkeypatch):
    from tunelab.experiments.results import rebuild_report
    from tunelab.experiments.study import run_study

    out = tmp_path / "sweep"
    # Interrupt the first run at step 3 (after its step-2 checkpoint), as a full disk would.
    monkeypatch.setenv("TUNELAB_FAULT", "step:3:enospc")
    with pytest.raises(Exception, match="No space left"):
        run_study(sweep_file, log=lambda *_: None)
    assert not (out / "lr-0.001" / "sweep-result.json").exists()
    monkeypatch.delenv("TUNELAB_FAULT")

    results = run_study(sweep_file, log=lambda *_: None)
    assert [r["name"] for r in results] == ["lr-0.001", "lr-0.01", "no-dedup"]
    first = json.loads((out / "lr-0.001" / "summary.json").read_text())
    assert first["resumed_from_step"] == 2 and first["steps"] == 4  # resumed, not restarted

    # Every run is judged on the same fixed held-out sets: same rows, and the same base loss (same base model).
    heldout = [json.loads((out / r["name"] / "eval" / "heldout.json").read_text()) for r in results]
    for name in ("general", "travel"):
        assert len({h[name]["rows_sha256"] for h in heldout}) == 1 and heldout[0][name]["rows"] > 0
        assert max(h[name]["base"] for h in heldout) - min(h[name]["base"] for h in heldout) < 1e-5
    assert heldout[0]["general"]["tuned"] != heldout[1]["general"]["tuned"]  # different lr, different adapter

    for r in results:
        assert r["travel_prompts"] == 2 and r["trainable_params"] > 0 and r["adapter_mib"] > 0
        assert r["final_train_loss"] > 0 and r["train_tok_per_s"] > 0 and len(r["curves"]["train"]) == 4
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["name"] for row in rows] == ["lr-0.001", "lr-0.01", "no-dedup"]
    assert {"train.lr", "data.dedup.exact"} <= set(rows[0])  # swept keys are columns
    markdown = (out / "results.md").read_text()
    assert "Best by held-out metrics" in markdown and "★" in markdown
    for plot in ("loss_curves.png", "metrics_vs_train_lr.png", "metrics_vs_data_dedup_exact.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG", plot

    # A third invocation retrains nothing: every run is finished and skipped.
    messages: list[str] = []
    run_study(sweep_file, log=messages.append)
    assert sum("finished earlier, skipped" in m for m in messages) == 3

    (out / "results.md").unlink()
    (out / "loss_curves.png").unlink()
    rebuild_report(out)
    assert (out / "results.md").read_text() == markdown and (out / "loss_curves.png").is_file()


def test_sweep_files_and_their_errors(tmp_path):
    from tunelab.experiments.study import check_requirements
    from tunelab.experiments.sweep_file import as_set_items, load_sweep, planned_runs

    configs = Path(__file__).resolve().parents[2] / "configs"
    lr_rank, _ = load_sweep(configs / "sweep-lr-rank.yaml")
    runs = planned_runs(lr_rank)
    assert len(runs) == 6 and runs[0].overrides == {"train.lr": 2e-4, "lora.r": 16, "lora.alpha": 32}
    assert all(r.overrides["lora.alpha"] == 2 * r.overrides["lora.r"] for r in runs)
    assert len(planned_runs(load_sweep(configs / "sweep-data.yaml")[0])) == 6
    assert [r.name for r in planned_runs(load_sweep(configs / "sweep-model-size.yaml")[0])] == [
        "smollm2-135m",
        "gemma3-270m",
    ]
    assert as_set_items({"train.lr": 5e-05, "data.sources": [{"preset": "embedded:sharegpt"}]}) == [
        "train.lr=5.0e-05",
        "data.sources=[{preset: 'embedded:sharegpt'}]",
    ]

    gpu, _ = load_sweep(configs / "sweep-model-size-gpu.yaml")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            check_requirements(gpu)

    bad = tmp_path / "bad.yaml"
    for text, message in (
        ("base: x.yaml\n", "give `grid` or `runs`"),
        ("base: x.yaml\ngrid: {train.lr: []}\n", "grid.train.lr: expected a non-empty list"),
        ("base: x.yaml\nruns: [{name: a}, {name: a}]\n", "two runs are named `a`"),
        ("base: x.yaml\nrunz: []\n", "runz"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            planned_runs(load_sweep(bad)[0])


def test_best_run_is_chosen_by_held_out_metrics_and_the_training_loss_winner_is_shown_beside_it():
    from tunelab.experiments.results import best_run, results_markdown, swept_keys, training_loss_winner

    def run(name, lr, train_loss, travel, general):
        return {
            "name": name,
            "overrides": {"train.lr": lr, "lora.r": 16},
            "final_train_loss": train_loss,
            "travel_score_tuned": travel,
            "general_val_loss_tuned": general,
            "curves": {"train": [], "val": []},
        }

    results = [
        run("memoriser", 2e-4, 0.9, 0.40, 1.60),
        run("generaliser", 5e-5, 1.3, 0.55, 1.48),
        run("tie-on-travel", 5e-6, 1.5, 0.55, 1.52),
    ]
    assert best_run(results)["name"] == "generaliser"  # best travel score; the tie is broken by general held-out loss
    assert training_loss_winner(results)["name"] == "memoriser"
    assert swept_keys(results) == ["train.lr"]  # lora.r never changes: not a swept key
    text = results_markdown(results, ["train.lr"])
    assert (
        "**generaliser**" in text
        and "Lowest training loss (mean of the last 10 steps): memoriser (0.9000) — not the same run." in text
    )
    assert "| generaliser ★ |" in text and "| memoriser (lowest train loss) |" in text


def test_the_training_loss_winner_is_judged_on_the_last_ten_steps_not_one_batch():
    """One step's loss swings with its batch: a run whose last batch happened to be easy does not win."""
    from tunelab.experiments.results import results_csv, train_loss_tail, training_loss_winner

    def run(name, losses):
        return {
            "name": name,
            "overrides": {},
            "final_train_loss": losses[-1],
            "curves": {"train": list(enumerate(losses, 1)), "val": []},
        }

    lucky = run("lucky-last-batch", [3.0] * 5 + [2.0] * 9 + [1.0])  # last step 1.0, last ten steps (9 x 2.0 + 1.0) / 10
    steady = run("steady", [3.0] * 5 + [1.5] * 10)
    assert train_loss_tail(lucky) == (9 * 2.0 + 1.0) / 10 and train_loss_tail(steady) == 1.5
    assert training_loss_winner([lucky, steady])["name"] == "steady"
    assert train_loss_tail({"final_train_loss": 1.25, "curves": {"train": []}}) == 1.25  # no curve: the final loss
    assert "1.9," in results_csv([lucky], [])  # the CSV carries the tail mean beside the last step's loss


def test_a_sweep_judges_its_ggufs_as_the_app_decodes_them(tmp_path, monkeypatch):
    """The shipped sweeps' travel rubric decodes as the app's planner does by default (day-plan grammar, the app's
    repetition penalty); the adapter comparison (no export) cannot take a grammar and is judged without it."""
    import tunelab.experiments.travel_eval as travel_eval
    from tunelab.experiments.study import _travel_eval
    from tunelab.experiments.sweep_file import load_sweep
    from tunelab.models.inference import GenerationParams
    from tunelab.serve.limits import PLANNER_DAY_FORMAT

    configs = Path(__file__).resolve().parents[2] / "configs"
    spec, spec_dir = load_sweep(configs / "sweep-lr-rank-short.yaml")
    asked = {}
    monkeypatch.setattr(
        travel_eval, "run_domain_eval", lambda run_dir, prompts, decoding, **kwargs: asked.update(decoding=decoding)
    )
    cfg = type("Cfg", (), {"model": type("M", (), {"name": "embedded:smollm2-135m"})})()
    _travel_eval(spec, spec_dir, tmp_path, cfg, tmp_path, log=lambda *_: None)
    assert PLANNER_DAY_FORMAT and asked["decoding"].day_grammar is True
    assert asked["decoding"].repetition_penalty == GenerationParams().repetition_penalty == 1.1
    _travel_eval(spec.model_copy(update={"export": False}), spec_dir, tmp_path, cfg, tmp_path, log=lambda *_: None)
    assert asked["decoding"].day_grammar is False

    # Every shipped study judges as the quickstart's check does: the app's planner decoding, greedy + 2 samples (the
    # smoke sweep checks the machinery in minutes, with 96 tokens and greedy answers only).
    from tunelab.experiments.travel_eval import planner_decoding

    studies = sorted(path.stem for path in configs.glob("sweep-*.yaml") if path.stem != "sweep-smoke")
    assert {"sweep-lr-rank-short", "sweep-data", "sweep-model-size", "sweep-recipe"} <= set(studies)
    for name in studies:
        assert load_sweep(configs / f"{name}.yaml")[0].travel_decoding == planner_decoding(samples=2), name


def test_the_report_is_rebuilt_in_the_order_the_sweep_ran_not_by_folder_name(tmp_path):
    from tunelab.experiments.study import RESULT_FILE, results_from_runs
    from tunelab.experiments.sweep_file import SweepSpec

    spec = SweepSpec.model_validate(
        {
            "base": "base.yaml",
            "runs": [{"name": "zeta", "set": {"train.lr": 1e-3}}, {"name": "alpha", "set": {"train.lr": 1e-2}}],
        }
    )
    for name in ("zeta", "alpha", "left-from-an-older-plan"):
        (tmp_path / name).mkdir()
        (tmp_path / name / RESULT_FILE).write_text(json.dumps({"name": name}))
    assert [r["name"] for r in results_from_runs(tmp_path)] == ["alpha", "left-from-an-older-plan", "zeta"]
    (tmp_path / "sweep.yaml").write_text(spec.model_dump_json(indent=2))  # as `tunelab sweep` records its plan
    assert [r["name"] for r in results_from_runs(tmp_path)] == ["zeta", "alpha"]
    (tmp_path / "sweep.yaml").write_text('{"base": "base.yaml", "a_field_of_an_older_schema": 1}')
    assert [r["name"] for r in results_from_runs(tmp_path)] == ["alpha", "left-from-an-older-plan", "zeta"]
