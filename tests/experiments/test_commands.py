"""`tunelab promote`, `tunelab data travel` and `tunelab quickstart` through the command line: every bad input is one
`error:` line and exit code 2, before any work; quickstart runs end to end with the smallest settings it accepts."""

from __future__ import annotations

import json

import pytest

from tests.helpers import assert_one_clear_error, fresh_cache, run_tunelab, small_llama_folder


def test_promote_errors_are_one_line_exit_2(tmp_path, capsys):
    from tunelab.serve.pointer import point_to

    ggufs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        ggufs.append(str(path))
    a, b = ggufs
    empty, served = tmp_path / "empty-serve", tmp_path / "serve"
    empty.mkdir()
    point_to(served, tmp_path / "a.gguf", None, None)  # one model, no history
    cases = [
        (["promote", "--rollback"], "--rollback: give --serve-dir"),
        (["promote", "--rollback", "--serve-dir", str(empty)], "no current model yet"),
        (["promote", "--rollback", "--serve-dir", str(served)], "nothing to roll back"),
        (["promote"], "give CANDIDATE and --over"),
        (["promote", a], "give CANDIDATE and --over"),
        (["promote", a, "--serve-dir", str(empty)], "no current model yet"),
        (["promote", str(tmp_path), "--over", b], "CANDIDATE"),
        (["promote", a, "--over", str(tmp_path / "missing.gguf")], "--over"),
        (["promote", a, "--over", b, "--set", "train.lr=1"], "only promote.* keys"),
        (["promote", a, "--over", b, "--set", "promote.min_regression_win_rate=2"], "min_regression_win_rate"),
        (["promote", a, "--over", b, "--evalset", str(tmp_path / "missing.jsonl")], "--evalset"),
        (["promote", a, "--over", b, "--space", str(tmp_path / "space")], "--space: give --serve-dir"),
    ]
    for args, needle in cases:
        assert_one_clear_error(run_tunelab(capsys, *args), needle)
    assert not (tmp_path / "space").exists() and not (tmp_path / "promote").exists()
    assert json.loads((served / "current.json").read_text())["model"] == str(tmp_path / "a.gguf")


def test_data_travel_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import tunelab.experiments.travel_data as travel_data

    monkeypatch.setattr(travel_data, "sharegpt_first_exchanges", lambda: iter([("Plan a day in Porto", "Day 1: go.")]))
    (tmp_path / "model.bin").write_bytes(b"not a model")
    hf_folder = small_llama_folder(tmp_path)  # loads in transformers, which has no llama.cpp sampler
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    cases = [
        (
            ["data", "travel", str(tmp_path / "a"), "--prompts", "1", "--model", str(tmp_path / "none.gguf")],
            "not found",
        ),
        (
            ["data", "travel", str(tmp_path / "b"), "--prompts", "1", "--model", str(tmp_path / "model.bin")],
            "model.bin",
        ),
        (
            ["data", "travel", str(tmp_path / "c"), "--prompts", "1", "--model", str(hf_folder)],
            "not a .gguf file",
        ),
        (
            ["data", "travel", str(tmp_path / "d"), "--prompts", "1", "--model", str(tmp_path / "broken.gguf")],
            "cannot load",
        ),
    ]
    plan = {
        "messages": [{"role": "user", "content": "A day in Porto"}, {"role": "assistant", "content": "Day 1: Ribeira."}]
    }
    bad_plan_files = {
        "not-json.jsonl": (json.dumps(plan) + "\n\n{oops\n", "not-json.jsonl:3: not valid JSON"),
        "a-list.jsonl": ("[1, 2]\n", "a-list.jsonl:1: expected a JSON object"),
        "no-messages.jsonl": (
            json.dumps(plan) + "\n" + json.dumps({"city": "Porto"}) + "\n",
            "no-messages.jsonl:2: needs `messages`",
        ),
        "bad-messages.jsonl": (
            json.dumps({"messages": [{"content": 3}, {"content": "x"}]}) + "\n",
            "bad-messages.jsonl:1: needs `messages`",
        ),
    }
    earlier = tmp_path / "earlier"  # a folder from an earlier run: a refused command leaves it as it was
    earlier.mkdir()
    (earlier / "counts.json").write_text('{"itineraries": {}}')
    for name, (text, needle) in bad_plan_files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        cases.append((["data", "travel", str(earlier), "--prompts", "0", "--recheck", str(tmp_path / name)], needle))
    cases.append(
        (["data", "travel", str(earlier), "--prompts", "0", "--recheck", str(tmp_path / "no.jsonl")], "no.jsonl")
    )
    for args, needle in cases:
        assert_one_clear_error(run_tunelab(capsys, *args), needle)
    assert sorted(p.name for p in earlier.iterdir()) == ["counts.json"]
    assert (earlier / "counts.json").read_text() == '{"itineraries": {}}'


def test_quickstart_errors_are_one_line_exit_2(tmp_path, capsys):
    cases = [
        (["quickstart", "--output", str(tmp_path / "q"), "--set", "train.nope=1"], "nope"),
        (["quickstart", "--output", str(tmp_path / "q"), "--set", "train.max_steps=0"], "max_steps"),
        (
            ["quickstart", "--output", str(tmp_path / "q"), "--set", "data.sources.7.weight=1"],
            "not an index of that list",
        ),
    ]
    for args, needle in cases:
        assert_one_clear_error(run_tunelab(capsys, *args), needle)
    assert not (tmp_path / "q").exists()


# The quickstart itself (embedded SmolLM2-135M, its config) made as small as its overrides allow: one training step
# on 100 embedded ShareGPT conversations, two held-out rows, one four-token sample, no travel rubric (that part is the
# export and `tunelab eval --prompts`, tested in tests/experiments/test_travel_eval.py and tests/export/).
TINY_QUICKSTART = [
    "data.sources=[{preset: 'embedded:sharegpt', max_records: 100}]",
    "data.val_fraction=0.2",
    "data.dedup.near=false",
    "train.max_steps=1",
    "train.save_steps=1",
    "train.eval_steps=1",
    "eval.max_val_rows=2",
    "eval.prompts=['Name a city in France.']",
    "eval.max_new_tokens=4",
]


@pytest.mark.slow
def test_quickstart_trains_and_judges_with_the_smallest_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(fresh_cache(tmp_path / "cache")))
    out = tmp_path / "quickstart"
    sets = [arg for item in TINY_QUICKSTART for arg in ("--set", item)]
    done = run_tunelab(capsys, "quickstart", "--output", str(out), "--travel-prompts", "0", *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert summary["steps"] == 1 and report["val_rows"] == 2 and report["base_model"] == "embedded:smollm2-135m"
    verdict = "lower" if report["improved"] else "NOT lower"
    assert f"tuned val loss {report['tuned']['val_loss']:.4f} is {verdict} than base" in done.stdout
    assert [s["prompt"] for s in report["samples"]] == ["Name a city in France."]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and "travel planner" not in done.stdout
    assert "travel" not in done.stdout.split("run folder:")[1].split("metrics.jsonl")[0]  # no travel file named


def test_the_quickstart_judges_the_travel_planner_as_the_app_decodes_it(tmp_path, monkeypatch):
    """The quickstart's travel check decodes as the app's Travel Planner starts out for a GGUF: the planner tab's
    temperature, token budget and day-by-day box (read from the built app), and the app's repetition penalty."""
    import tunelab.experiments.travel_eval as travel_eval
    from tests.helpers import GrammarBackend, starting_values
    from tunelab.experiments.quickstart import _travel_check
    from tunelab.models.inference import GenerationParams
    from tunelab.serve.app import build_app

    demo = build_app(GrammarBackend(), tmp_path / "fb.db")  # a model that takes grammars, as a GGUF does
    try:
        starts = starting_values(demo)
    finally:
        demo.close()
    asked = {}

    def judged(run_dir, prompts_source, decoding, **settings):
        asked.update(settings, decoding=decoding)
        return {"pairs": {"gguf": {"wins": 1}}, "decoding": {"day_grammar": decoding.day_grammar}}

    exported = tmp_path / "model-q4_k_m.gguf"
    exported.touch()
    monkeypatch.setattr(travel_eval, "tuned_gguf_path", lambda run_dir: exported)  # already exported: no export
    monkeypatch.setattr(travel_eval, "run_domain_eval", judged)
    _travel_check(tmp_path, prompts=3, log=lambda *_: None, samples=2, threads=1)
    decoding = asked["decoding"]
    assert decoding.day_grammar is starts["planner-day-format"] is True
    assert decoding.temperature == starts["planner-temperature"]
    assert decoding.max_new_tokens == starts["planner-max-tokens"]
    assert decoding.repetition_penalty == GenerationParams().repetition_penalty
    assert (decoding.samples, asked["threads"], asked["limit"], asked["adapter"]) == (2, 1, 3, False)


def test_the_quickstart_check_answers_base_and_tuned_side_by_side_by_default(monkeypatch):
    from tunelab.eval.domain import sides_fit_side_by_side
    from tunelab.experiments.quickstart import half_the_cores

    for cores, threads in ((1, 1), (2, 1), (3, 1), (16, 8)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert half_the_cores() == threads
        assert sides_fit_side_by_side(threads) is (cores >= 2)
