"""`tunelab promote`: the gate takes a trained adapter over an untrained one, refuses a noised copy of the trained
adapter, writes its report, moves the serve folder's `current` pointer only on pass, and rolls back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.helpers import small_llama_folder
from tunelab.cli import app as cli_app
from tunelab.errors import UserError
from tunelab.experiments.promote import Check, decide, gates_for, promote, rubric_passes
from tunelab.serve.pointer import point_to, read_pointer, resolve_model, rollback

pytestmark = pytest.mark.slow  # trains a small model (about a minute on 2 cores)


def sums_file(path, numbers):
    with open(path, "w") as f:
        for i in numbers:
            messages = [{"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def evalset_file(path, numbers):
    records = [
        {"prompt": f"What is {i} plus {i}?", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
         "reference": f"{i} plus {i} is {2 * i}."}
        for i in numbers
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in [{"evalset": {"version": "test"}}, *records]) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """good: trained on the sums; current: same LoRA untrained (= the base); worse: good + heavy noise."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config
    from tunelab.train.recipe import run_training

    root = tmp_path_factory.mktemp("promote")
    base = small_llama_folder(root)
    config = {
        "model": {"name": str(base)},
        "data": {"sources": [{"path": str(sums_file(root / "sums.jsonl", range(48)))}], "val_fraction": 0.25,
                 "dedup": {"near": False}, "output_dir": str(root / "prepared")},
        "lora": {"r": 8, "alpha": 16},
        "train": {"output_dir": str(root / "good"), "max_steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0,
                  "max_seq_len": 64, "save_steps": 30, "eval_steps": 30, "precision": "fp32"},
    }  # fmt: skip
    (root / "good.yaml").write_text(yaml.safe_dump(config))
    run_training(load_config(root / "good.yaml"), log=lambda *a, **k: None)
    good = root / "good"

    current = root / "current"
    shutil.copytree(good, current, ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    adapter_cfg = json.loads((good / "adapter" / "adapter_config.json").read_text())
    untrained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(
            r=adapter_cfg["r"], lora_alpha=adapter_cfg["lora_alpha"], target_modules=adapter_cfg["target_modules"]
        ),
    )
    untrained.save_pretrained(current / "adapter")  # LoRA B = 0: exactly the base model

    worse = root / "worse"
    shutil.copytree(good, worse, ignore=shutil.ignore_patterns("checkpoints"))
    weights = worse / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(0)
    noised = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    save_file(noised, weights)
    return {"root": root, "base": base, "good": good, "current": current, "worse": worse}


def test_gate_accepts_the_better_adapter_refuses_the_worse_and_rolls_back(runs):
    root = runs["root"]
    serve = root / "serve"
    evalset = evalset_file(root / "evalset-test.jsonl", range(60, 72))  # prompts the training never saw
    point_to(serve, runs["current"], None, None)  # what is served today

    better = promote(runs["good"], runs["current"], serve, evalset=evalset, log=lambda *a: None)
    checks = {c.name: c for c in better.checks}
    assert better.promote, better.reason
    assert checks["val_loss"].candidate < checks["val_loss"].current
    assert checks["regression"].candidate > 0.5
    assert checks["rubric"].passed is None and checks["latency"].passed is None  # no rubric, no exports
    assert resolve_model(serve) == runs["good"].resolve()
    reports = sorted((serve / "decisions").glob("decision-*"))
    assert [p.suffix for p in reports] == [".json", ".md"]
    assert json.loads(reports[0].read_text())["promote"] is True
    assert "PROMOTE" in reports[1].read_text()

    result = CliRunner().invoke(cli_app, [
        "promote", str(runs["worse"]), "--over", str(runs["good"]), "--serve-dir", str(serve),
        "--evalset", str(evalset),
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "KEEP CURRENT" in result.output and "gate(s) failed: val_loss" in result.output
    assert resolve_model(serve) == runs["good"].resolve()  # refused: the pointer did not move

    result = CliRunner().invoke(cli_app, ["promote", "--rollback", "--serve-dir", str(serve)])
    assert result.exit_code == 0, result.output
    assert resolve_model(serve) == runs["current"].resolve()
    assert read_pointer(serve)["history"] == []
    with pytest.raises(UserError, match="nothing to roll back"):
        rollback(serve)


def base_greedy_answers(base_dir, questions, max_new_tokens=16) -> list[str]:
    """What the base model (= the current run: its LoRA B is 0) answers itself, greedily, in plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def test_a_stricter_gate_from_set_refuses_the_same_better_adapter(runs):
    """A regression set the trained adapter wins only in part: unseen sums (it gives their references a higher
    log-prob than the base) and four questions whose references are the base model's own greedy answers (which the
    current model, i.e. the base, prefers). The default gates promote it; `--set promote.min_regression_win_rate=1.0`
    refuses it, on the regression gate alone."""
    questions = [f"Tell me about the number {i}." for i in (3, 5, 7, 9)]
    own = [
        {"prompt": q, "messages": [{"role": "user", "content": q}], "reference": a}
        for q, a in zip(questions, base_greedy_answers(runs["base"], questions))
    ]
    evalset = evalset_file(runs["root"] / "evalset-mixed.jsonl", range(60, 72))
    evalset.write_text(evalset.read_text() + "".join(json.dumps(r) + "\n" for r in own))

    default = promote(runs["good"], runs["current"], None, evalset=evalset, log=lambda *a: None)
    regression = {c.name: c for c in default.checks}["regression"]
    assert default.promote, default.reason
    assert 0.5 < regression.candidate < 1.0 and "16 references" in regression.note

    result = CliRunner().invoke(cli_app, [
        "promote", str(runs["good"]), "--over", str(runs["current"]), "--evalset", str(evalset),
        "--set", "promote.min_regression_win_rate=1.0",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "KEEP CURRENT" in result.output and "reason: gate(s) failed: regression" in result.output
    decisions = sorted((runs["good"] / "promote").glob("decision-*.json"))  # no serve dir: next to the candidate
    assert json.loads(decisions[-1].read_text())["gates"]["min_regression_win_rate"] == 1.0


def test_decide_and_gate_overrides(tmp_path):
    assert decide([Check("a", 1, 1, "-", None)]) == (False, "no gate could be measured")
    assert decide([Check("a", 1, 1, "-", True), Check("b", 1, 2, "-", False)])[0] is False
    assert decide([Check("a", 1, 1, "-", True), Check("b", None, None, "-", None)])[0] is True
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert gates_for(gguf, ["promote.min_regression_win_rate=0.7"]).min_regression_win_rate == 0.7
    with pytest.raises(UserError, match="only promote"):
        gates_for(gguf, ["train.lr=1"])
    with pytest.raises(UserError, match="not a run folder"):
        promote(tmp_path, gguf, None, log=lambda *a: None)


def test_the_rubric_gate_decides_on_the_lower_end_of_the_win_rate_interval():
    from tunelab.eval.stats import paired_comparison

    def comparison(wins, losses, ties=0):
        return paired_comparison([0.5] * (wins + losses + ties), [0.8] * wins + [0.2] * losses + [0.5] * ties)

    # 7 of 12 is a 58 % point estimate, above 0.5, but its interval reaches far below: refused.
    seven_of_twelve = comparison(7, 5)
    assert seven_of_twelve["win_rate_non_tied"] > 0.5 and seven_of_twelve["win_rate_interval"][0] < 0.5
    assert not rubric_passes(seven_of_twelve, 0.5)
    # 29 wins / 12 losses (the sign test's p = 0.0115): the interval clears 0.5.
    assert comparison(29, 12)["win_rate_interval"][0] > 0.5 and rubric_passes(comparison(29, 12), 0.5)
    assert not rubric_passes(comparison(0, 0, ties=12), 0.0)  # nothing decided shows nothing
    assert rubric_passes(seven_of_twelve, 0.2)


def test_the_space_bundle_follows_the_pointer(tmp_path):
    from tunelab.serve.pointer import refresh_space

    exports = []
    for name in ("old", "new"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model-q4_k_m.gguf").write_bytes(f"GGUF {name}".encode())
        exports.append(folder / "model-q4_k_m.gguf")
    serve, space = tmp_path / "serve", tmp_path / "space"
    point_to(serve, exports[0], None, None)
    point_to(serve, exports[1], None, None)
    assert refresh_space(serve, space).read_bytes() == b"GGUF new"
    assert (space / "app.py").is_file() and (space / "tunelab" / "serve" / "app.py").is_file()
    rollback(serve)
    assert refresh_space(serve, space).read_bytes() == b"GGUF old"
    point_to(serve, tmp_path, None, None)  # a run folder: not what a Space ships
    with pytest.raises(UserError, match="not a model-q4_k_m.gguf export"):
        refresh_space(serve, space)


def test_over_defaults_to_the_run_behind_what_the_serve_dir_serves(tmp_path):
    from tunelab.experiments.promote import served_run

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("{}\n")
    (run / "export").mkdir()
    (run / "export" / "model-q4_k_m.gguf").write_bytes(b"GGUF")
    point_to(tmp_path / "serve", run / "export" / "model-q4_k_m.gguf", None, None)
    assert served_run(tmp_path / "serve") == run.resolve()
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    point_to(tmp_path / "serve", other, None, None)
    assert served_run(tmp_path / "serve") == other.resolve()
    with pytest.raises(UserError, match="no current model"):
        served_run(tmp_path / "empty")


def test_rubric_gate_on_two_q4_k_m_files(tmp_path):
    """The same GGUF on both sides, greedy plus one sampled answer from the same seed, decoded as the app's planner
    decodes (the day-plan grammar): the prompt ties, so nothing shows the candidate better and the gate (on the
    interval, not the point) refuses it."""
    from tests.helpers import embedded_gguf
    from tunelab.config import PromoteConfig
    from tunelab.experiments.promote import rubric_check

    gguf = embedded_gguf()
    gates = PromoteConfig(rubric_prompts=1, rubric_max_new_tokens=12, rubric_samples=1)
    check = rubric_check(gguf, gguf, gates, 1, log=lambda *a: None)
    assert check.passed is False and check.current == check.candidate
    assert "0 wins / 1 ties / 0 losses" in check.note and "no detectable difference" in check.note
    assert "under the day-plan grammar" in check.note
    assert check.current > 0.8  # a 12-token answer could not score so: the grammar's budget decided the length
    assert "side by side" not in check.note  # `make test` gives each worker one core: no room for two models
    with pytest.MonkeyPatch.context() as two_cores:
        two_cores.setattr("os.sched_getaffinity", lambda pid: {0, 1})
        at_once = rubric_check(gguf, gguf, gates, 1, log=lambda *a: None)
    assert "side by side on 1 thread(s) each" in at_once.note
    assert (at_once.current, at_once.candidate, at_once.passed) == (check.current, check.candidate, check.passed)
    run_without_export = tmp_path / "run"
    assert rubric_check(run_without_export, gguf, gates, 1, log=lambda *a: None).passed is None
