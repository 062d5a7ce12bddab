"""`tunelab eval RUN --prompts FILE.jsonl` on a small run: answers match plain transformers/PEFT greedy decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import small_lora_run

PROMPTS = [
    {"prompt": "Plan 2 days in Oslo for a museum lover.", "city": "Oslo", "days": 2, "preferences": ["museums"]},
    {"prompt": "What should I do in Lima?"},
]


def _small_run(tmp_path):
    run_dir, base_dir = small_lora_run(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return run_dir, base_dir, prompts


def _reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new[-1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_domain_eval_answers_are_plain_greedy_from_base_and_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, base_dir, prompts = _small_run(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelab.cli",
            "eval",
            str(run_dir),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            "12",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GGUF comparison skipped" in done.stdout and "judge: none given" in done.stdout
    report = json.loads((run_dir / "eval" / "domain-prompts.json").read_text())
    pair = report["pairs"]["adapter"]
    assert pair["wins"] + pair["ties"] + pair["losses"] == 2 and (run_dir / "eval" / "domain-prompts.md").is_file()

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run_dir / "adapter")).eval()
    for row, spec in zip(pair["answers"], PROMPTS):
        assert (row["base"]["text"], row["base"]["finished"]) == _reference_greedy(base, tokenizer, spec["prompt"], 12)
        assert (row["tuned"]["text"], row["tuned"]["finished"]) == _reference_greedy(
            tuned, tokenizer, spec["prompt"], 12
        )
    assert pair["answers"][0]["base"]["text"] != pair["answers"][0]["tuned"]["text"]  # the adapter really was on
    # The second prompt has no city/days/preferences: those criteria are not judged.
    criteria = pair["answers"][1]["tuned"]["criteria"]
    assert criteria["city_named"] is None and criteria["days_honoured"] is None and criteria["preferences"] is None


def test_domain_eval_refuses_a_folder_that_is_not_a_run(tmp_path):
    from tunelab.errors import UserError
    from tunelab.experiments.travel_eval import run_domain_eval

    with pytest.raises(UserError, match="not a finished tunelab run"):
        run_domain_eval(tmp_path, "travel")


@pytest.mark.slow
def test_domain_eval_of_another_gguf_type_uses_that_type_on_both_sides(tmp_path):
    """`--quant q8_0`: the tuned RUN/export/model-q8_0.gguf against a base exported to the same type, answers in
    their own files (the shipped q4_k_m's are not overwritten); an unknown type is one line, exit code 2."""
    from tunelab.export.gguf import gguf_metadata
    from tunelab.export.pipeline import export_run

    run_dir, _, prompts = _small_run(tmp_path)
    export_run(run_dir, ["q8_0"], threads=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [
        sys.executable,
        "-m",
        "tunelab.cli",
        "eval",
        str(run_dir),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "8",
        "--threads",
        "1",
        "--no-adapter",
        "--quant",
    ]
    done = subprocess.run([*args, "q8_0"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((run_dir / "eval" / "domain-prompts-q8_0.json").read_text())
    assert not (run_dir / "eval" / "domain-prompts.json").exists()
    assert list(report["pairs"]) == ["gguf"]  # --no-adapter: llama.cpp only
    pair = report["pairs"]["gguf"]
    assert (pair["base"], pair["tuned"]) == (
        str(run_dir / "export" / "base-q8_0.gguf"),
        str(run_dir / "export" / "model-q8_0.gguf"),
    )
    q8_0 = 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0
    assert gguf_metadata(run_dir / "export" / "base-q8_0.gguf")["general.file_type"] == q8_0
    assert gguf_metadata(run_dir / "export" / "model-q8_0.gguf")["general.file_type"] == q8_0
    assert pair["wins"] + pair["ties"] + pair["losses"] == 2

    bad = subprocess.run([*args, "q9_9"], capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "--quant: unknown type `q9_9`" in bad.stderr + bad.stdout
    missing = subprocess.run([*args, "q5_k_m"], capture_output=True, text=True, timeout=600, env=env)
    assert missing.returncode == 2 and "nothing to compare" in missing.stderr + missing.stdout


@pytest.mark.slow
def test_the_verdict_is_the_same_on_one_and_two_threads(tmp_path, monkeypatch):
    """The real judge path (llama.cpp GGUFs, greedy + 2 sampled answers per prompt and side, the statistics) run
    on 1 and on 2 threads: every prompt has the same outcome and the comparison the same verdict, and each run's
    mean score difference lies in the other's 95 % interval; the same thread count again samples the same answers,
    whether the two models answered side by side or one after the other. Threads, k and the seeds are in the
    report."""
    import tunelab.eval.domain as domain
    from tunelab.experiments.travel_eval import run_domain_eval
    from tunelab.export.pipeline import export_run

    run_dir, _, prompts = _small_run(tmp_path)
    export_run(run_dir, ["q8_0"], threads=1)
    reports = []
    for threads, side_by_side in ((1, True), (2, False), (1, False)):
        # Side by side whatever cores this test was given (`make test` pins each worker to one).
        monkeypatch.setattr(domain, "sides_fit_side_by_side", lambda threads, at_once=side_by_side: at_once)
        decoding = domain.Decoding(max_new_tokens=16, samples=2, seed=5)
        report = run_domain_eval(run_dir, str(prompts), decoding, adapter=False, threads=threads, quant="q8_0",
                                 log=lambda *a: None)  # fmt: skip
        assert report["threads"] == threads and report["gguf_sides_at_once"] is side_by_side
        decoding = report["decoding"]
        assert (decoding["samples"], decoding["seed"], decoding["temperature"]) == (2, 5, 0.7)
        reports.append(report["pairs"]["gguf"])
    one, two, again = reports
    assert [row["outcome"] for row in one["answers"]] == [row["outcome"] for row in two["answers"]]
    assert one["verdict"] == two["verdict"] and one["sign_test_p"] == two["sign_test_p"]
    for a, b in ((one, two), (two, one)):
        low, high = a["mean_difference_interval"]
        assert low <= b["mean_difference"] <= high
    # Each side answered greedily and with seeds 5 and 6; sampling at temperature 0.7 changes the text.
    answer = one["answers"][0]["tuned"]
    assert [s["seed"] for s in answer["samples"]] == [5, 6]
    assert any(s["text"] != answer["text"] for s in answer["samples"])
    assert answer["score"] == pytest.approx((answer["greedy_score"] + sum(s["score"] for s in answer["samples"])) / 3)

    # Fixed seeds: the same thread count samples the same answers again, one side at a time as side by side.
    def texts(report):
        return [[[row[side]["text"]] + [s["text"] for s in row[side]["samples"]] for side in ("base", "tuned")]
                for row in report["answers"]]  # fmt: skip

    assert texts(one) == texts(again)


def test_a_shared_base_gguf_answers_once_and_its_kept_answers_are_the_ones_llama_cpp_gives(tmp_path, monkeypatch):
    """A sweep's runs of one base model share its base GGUF (`base_gguf`): the base side is answered in llama.cpp
    once and reused by the next run; the reused answers equal the ones llama.cpp gave, and another decoding asks
    llama.cpp again."""
    import tunelab.eval.domain as domain
    from tunelab.eval.domain import Decoding
    from tunelab.experiments.travel_eval import run_domain_eval
    from tunelab.export.pipeline import export_run

    run_dir, _, prompts = _small_run(tmp_path)
    export_run(run_dir, ["q8_0"], threads=1)
    shared = tmp_path / "base-models" / "small-q8_0.gguf"
    calls = []
    real_answer = domain.answer_in_llama_cpp
    monkeypatch.setattr(domain, "answer_in_llama_cpp", lambda *a, **k: calls.append(1) or real_answer(*a, **k))

    def judged(decoding):
        calls.clear()
        report = run_domain_eval(run_dir, str(prompts), decoding, adapter=False, threads=1, log=lambda *a: None,
                                 base_gguf=shared, quant="q8_0")  # fmt: skip
        return report["pairs"]["gguf"]["answers"], len(calls)

    decoding = Decoding(max_new_tokens=8, samples=1, seed=3)
    per_side = len(PROMPTS) * 2  # greedy + 1 sample per prompt
    fresh, asked = judged(decoding)
    assert asked == 2 * per_side and shared.with_suffix(".answers.json").is_file()
    again, asked = judged(decoding)
    assert asked == per_side  # the tuned side only
    for side in ("base", "tuned"):
        assert [(r[side]["text"], r[side]["samples"]) for r in again] == [
            (r[side]["text"], r[side]["samples"]) for r in fresh
        ]
    _, asked = judged(Decoding(max_new_tokens=5, samples=1, seed=3))
    assert asked == 2 * per_side
