"""`tunelab sweep CONFIG --grid ...`, `tunelab sweep SWEEP.yaml` and `tunelab report` through the command line, on a
tiny model: every run is judged on the same held-out rows, whatever the grid changes in a run's own data."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from tests.helpers import assert_one_clear_error, build_tiny_llama, fresh_cache, run_tunelab
from tunelab.config import ConfigError


@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    """A base config on a tiny Llama whose data has exact duplicates, so `data.dedup.exact` changes its own splits."""
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    monkeypatch.setenv("TUNELAB_CACHE", str(fresh_cache(tmp_path / "cache")))
    model_dir = tmp_path / "tiny"
    tokenizer = load_tokenizer(ModelConfig())
    build_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cities = ["Lisbon", "Paris", "Rome", "Oslo", "Cairo", "Lima", "Tokyo", "Quito", "Accra", "Hanoi"]
    with open(tmp_path / "chats.jsonl", "w") as f:
        for i in range(40):
            city = cities[i % len(cities)]
            messages = [
                {"role": "user", "content": f"Question {i}: what should I see in {city} on day {i % 5 + 1}?"},
                {"role": "assistant", "content": f"In {city}, the old town, then a museum; day {i % 5 + 1} ends late."},
            ]
            for _ in range(1 + (i % 2 == 0)):  # every other conversation twice: dedup off keeps the copies
                f.write(json.dumps({"messages": messages}) + "\n")
    config = {
        "data": {"sources": [{"path": str(tmp_path / "chats.jsonl")}], "val_fraction": 0.25, "dedup": {"near": False}},
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "output_dir": str(tmp_path / "runs" / "base"),
            "max_steps": 2,
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
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path


def own_val_digest(run_dir) -> str:
    """Digest of the rows of the run's own validation split (what the removed grid engine judged it on)."""
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.experiments.study import rows_digest
    from tunelab.models.runs import run_config
    from tunelab.train.recipe import rows_of

    return rows_digest(rows_of(load_prepared(prepare_dataset(run_config(run_dir)))[1]))


def test_grid_sweep_judges_every_run_on_the_same_held_out_rows(tiny_setup, capsys):
    config, tmp_path = tiny_setup
    out = tmp_path / "sweep"
    done = run_tunelab(capsys, "sweep", str(config), "--grid", "data.dedup.exact=true,false", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]

    names = ["exact-True", "exact-False"]
    heldout = {name: json.loads((out / name / "eval" / "heldout.json").read_text()) for name in names}
    assert set(heldout["exact-True"]) == {"general"}  # the shortcut has no travel set
    general = {name: heldout[name]["general"] for name in names}
    assert general["exact-True"]["rows_sha256"] == general["exact-False"]["rows_sha256"]
    assert general["exact-True"]["rows"] == general["exact-False"]["rows"] > 0
    # The grid changed the runs' own validation splits: judging each on its own would compare different rows.
    own = {name: own_val_digest(out / name) for name in names}
    assert own["exact-True"] != own["exact-False"]
    assert own["exact-True"] == general["exact-True"]["rows_sha256"]  # the fixed set is the base config's own split

    results = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(results) == set(names)
    for name in names:
        result = json.loads((out / name / "sweep-result.json").read_text())
        assert float(results[name]["general_val_loss_tuned"]) == result["general_val_loss_tuned"] > 0
        assert result["overrides"] == {"data.dedup.exact": name == "exact-True"}
    assert (out / "results.md").is_file() and (out / "loss_curves.png").stat().st_size > 0
    assert not (out / "sweep.json").exists()  # the grid shortcut writes the sweep engine's report, nothing else
    spec = yaml.safe_load((out / "sweep.yaml").read_text())
    assert spec["grid"] == {"data.dedup.exact": [True, False]} and spec["export"] is False

    # A sweep file that extends what was run: the finished runs are skipped, the new one is judged on the same rows.
    extended = {**spec, "output": str(out), "runs": [{"name": "rank-2", "set": {"lora.r": 2, "lora.alpha": 4}}]}
    (tmp_path / "extended.yaml").write_text(yaml.safe_dump(extended))
    done = run_tunelab(capsys, "sweep", str(tmp_path / "extended.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished earlier, skipped") == 2
    rank2 = json.loads((out / "rank-2" / "eval" / "heldout.json").read_text())["general"]
    assert rank2["rows_sha256"] == general["exact-True"]["rows_sha256"]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 3

    # Resumed under a sweep file that judges otherwise, or with a finished run's settings changed: refused before
    # anything is trained or written, so one table never mixes two judges.
    finished = (out / "rank-2" / "sweep-result.json").read_text()
    for changed, needle in (
        ({**extended, "travel_eval": {**spec["travel_eval"], "limit": 5}}, "differs in travel_eval"),
        ({**extended, "runs": [{"name": "rank-2", "set": {"lora.r": 4, "lora.alpha": 8}}]}, "run rank-2 finished"),
    ):
        (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
        assert_one_clear_error(run_tunelab(capsys, "sweep", str(tmp_path / "changed.yaml")), needle)
    # --threads pins every run's cores (training, judging, latency): resuming on other cores is refused as well.
    assert_one_clear_error(
        run_tunelab(capsys, "sweep", str(tmp_path / "extended.yaml"), "--threads", "3"), "differs in set, latency"
    )
    assert (out / "rank-2" / "sweep-result.json").read_text() == finished
    assert yaml.safe_load((out / "sweep.yaml").read_text())["runs"] == extended["runs"]

    (out / "results.csv").unlink()
    done = run_tunelab(capsys, "report", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out / 'results.csv'}" in done.stdout
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 3


def test_sweep_and_report_errors_are_one_line_exit_2(tiny_setup, capsys):
    config, tmp_path = tiny_setup
    (tmp_path / "not-a-mapping.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad-key.yaml").write_text(yaml.safe_dump({"base": str(config), "grid": {"lora.r": [2]}, "nope": 1}))
    cases = [
        (["sweep", str(config), "--grid", "train.lr"], "expected key.path=v1,v2"),
        (["sweep", str(config), "--grid", "lora.r=2", "--grid", "lora.r=4"], "given twice"),
        (["sweep", str(config), "--grid", "lora.rank=2,4"], "lora.rank"),
        (["sweep", str(config), "--grid", "data.val_fraction=0.1,0.2"], "val_fraction must stay"),
        (["sweep", str(config), "--set", "train.lr=1e-3"], "--set: only with --grid"),
        (["sweep", str(tmp_path / "missing.yaml")], "sweep file not found"),
        (["sweep", str(tmp_path / "not-a-mapping.yaml")], "expected a mapping"),
        (["sweep", str(tmp_path / "bad-key.yaml")], "nope"),
        (["report", str(tmp_path / "missing")], "not a folder"),
        (["report", str(tmp_path)], "no finished sweep runs"),
    ]
    for args, needle in cases:
        assert_one_clear_error(run_tunelab(capsys, *args), needle)
    assert not (tmp_path / "runs").exists()  # every error came before anything was trained


def test_threads_pin_every_runs_training_and_llama_cpp(tiny_setup):
    from tunelab.experiments.study import run_config_for
    from tunelab.experiments.sweep_file import grid_sweep, planned_runs, with_threads

    config, tmp_path = tiny_setup  # its train.threads is 1
    spec, spec_dir = grid_sweep(config, ["lora.r=2,4"], [])
    pinned = with_threads(spec, 3)
    assert (pinned.latency.threads, spec.latency.threads) == (3, 2)
    configs = [run_config_for(pinned, spec_dir, run, tmp_path / "out") for run in planned_runs(pinned)]
    assert [cfg.train.threads for cfg in configs] == [3, 3]
    assert with_threads(spec, None) is spec


def test_grid_items_parse_to_a_sweep_grid():
    from tunelab.experiments.sweep_file import SweepSpec, parse_grid, planned_runs

    grid = parse_grid(["train.lr=1e-4,2e-4", "lora.r=8,16"])
    assert grid == {"train.lr": [1e-4, 2e-4], "lora.r": [8, 16]}
    assert [(r.name, r.overrides) for r in planned_runs(SweepSpec(base="x", grid=grid))] == [
        ("lr-0.0001_r-8", {"train.lr": 1e-4, "lora.r": 8}),
        ("lr-0.0001_r-16", {"train.lr": 1e-4, "lora.r": 16}),
        ("lr-0.0002_r-8", {"train.lr": 2e-4, "lora.r": 8}),
        ("lr-0.0002_r-16", {"train.lr": 2e-4, "lora.r": 16}),
    ]
    for bad in (["train.lr"], ["=1,2"], ["lora.r="], ["lora.r=8", "lora.r=16"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)
