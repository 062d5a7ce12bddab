"""eval/domain.py: the answer store (what makes a kept answer reusable, and what does not) and answering the two
sides of a comparison at once."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tunelab.eval.domain import Decoding, compare_pair, remembered, sides_fit_side_by_side
from tunelab.eval.rubric import Answer, TravelPrompt


def test_a_kept_answer_is_reused_only_for_the_same_prompt_seed_file_decoding_and_threads(tmp_path):
    model, store = tmp_path / "base.gguf", tmp_path / "base.answers.json"
    model.write_bytes(b"weights")
    asked = []

    def generate(prompt, seed):
        asked.append((prompt.prompt, seed))
        return Answer(f"{prompt.prompt} #{len(asked)}", finished=seed is None)

    oslo, lima = TravelPrompt("Plan 2 days in Oslo.", city="Oslo", days=2), TravelPrompt("Lima?")
    first = remembered(generate, store, model, Decoding(samples=1), threads=1)
    assert first(oslo, None) == Answer("Plan 2 days in Oslo. #1", True)
    assert first(oslo, 0) == Answer("Plan 2 days in Oslo. #2", False)
    assert first(oslo, None).text.endswith("#1") and len(asked) == 2  # kept in this process

    later = remembered(generate, store, model, Decoding(samples=1), threads=1)  # a later run, the same file on disk
    assert later(oslo, None) == Answer("Plan 2 days in Oslo. #1", True) and len(asked) == 2
    assert later(lima, None).text == "Lima? #3"  # another prompt is answered

    for changed in (
        remembered(generate, store, model, Decoding(samples=1, temperature=0.9), threads=1),
        remembered(generate, store, model, Decoding(samples=1), threads=2),
    ):
        before = len(asked)
        changed(oslo, None)
        assert len(asked) == before + 1
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the base GGUF was made again
    before = len(asked)
    remembered(generate, store, model, Decoding(samples=1), threads=1)(oslo, None)
    assert len(asked) == before + 1


def test_side_by_side_answers_both_sides_at_once_and_compares_as_one_after_the_other():
    prompts = [TravelPrompt(f"Plan {days} days in Oslo.", city="Oslo", days=days) for days in (1, 2, 3)]

    def generator(extra_day: bool, both_inside: threading.Barrier | None = None):
        def generate(prompt, seed):
            if both_inside is not None:
                both_inside.wait()  # raises after its timeout unless the other side is answering at the same time
            days = prompt.days + (extra_day and seed is None)
            return Answer("\n".join(f"Day {d}: Oslo harbour, seed {seed}" for d in range(1, days + 1)), finished=True)

        return generate

    together = threading.Barrier(2, timeout=30)
    at_once = compare_pair(prompts, generator(False, together), generator(True, together), lambda *a: None,
                           decoding=Decoding(samples=1), side_by_side=True)  # fmt: skip
    in_turn = compare_pair(prompts, generator(False), generator(True), lambda *a: None, decoding=Decoding(samples=1))
    assert at_once == in_turn
    assert [row["outcome"] for row in at_once["answers"]] == ["loss"] * 3  # the tuned greedy plan has a day too many
    with pytest.raises(threading.BrokenBarrierError):  # one side at a time: the barrier is never passed
        compare_pair(prompts[:1], generator(False, threading.Barrier(2, timeout=1)), generator(True), lambda *a: None)


def test_two_models_go_side_by_side_only_on_cores_of_their_own():
    cores = len(os.sched_getaffinity(0))
    assert sides_fit_side_by_side(max(1, cores // 2)) is (cores >= 2)  # `make test` pins each worker to one core
    assert not sides_fit_side_by_side(cores // 2 + 1)
    assert not sides_fit_side_by_side(None)  # llama.cpp's default takes every core for one model


def test_a_base_whose_answers_are_all_kept_is_never_loaded(tmp_path, monkeypatch):
    """A sweep's later runs judge only the tuned side: the base GGUF's answers come from the store, and llama.cpp
    never loads the base file (a few seconds and its memory per run for a larger base)."""
    from tests.helpers import embedded_gguf
    from tunelab.eval import domain

    base = embedded_gguf()
    tuned = tmp_path / "tuned.gguf"
    tuned.symlink_to(base)
    loaded = []
    real_load = domain.load_backend
    monkeypatch.setattr(domain, "load_backend", lambda path, **kw: loaded.append(Path(path)) or real_load(path, **kw))
    prompts = [TravelPrompt("Plan 1 day in Oslo.", city="Oslo", days=1)]
    decoding = Decoding(max_new_tokens=8, samples=1)
    store = tmp_path / "base-answers.json"

    def judge(run: str) -> dict:
        (tmp_path / run).mkdir()
        return domain.evaluate_domain(tmp_path / run, prompts, decoding=decoding, ggufs=(base, tuned), adapter=False,
                                      threads=1, log=lambda *a: None, base_answers=store)  # fmt: skip

    first = judge("first")
    assert sorted(loaded) == sorted([base, tuned])
    loaded.clear()
    later = judge("later")
    assert loaded == [tuned]
    assert later["pairs"]["gguf"]["answers"] == first["pairs"]["gguf"]["answers"]
