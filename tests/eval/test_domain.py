"""eval/domain.py's answer store: what makes a kept answer reusable, and what does not."""

from __future__ import annotations

import os

from tunelab.eval.domain import Decoding, remembered
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
