"""The ChatBackend interface: both backends, same template, streaming, EOS, sampling params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunelab.errors import UserError
from tunelab.models.inference import GenerationParams, load_backend

os.environ.setdefault("OMP_NUM_THREADS", "1")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=40, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def base_hf_dir() -> Path:
    from tunelab.models import resolve_model_path

    return Path(resolve_model_path("embedded:smollm2-135m"))


@pytest.fixture(scope="module")
def base_f16_gguf(base_hf_dir, tmp_path_factory) -> Path:
    from tunelab.export.gguf import convert_hf_to_gguf

    return convert_hf_to_gguf(base_hf_dir, tmp_path_factory.mktemp("gguf") / "base-f16.gguf")


def test_load_backend_rejects_what_it_cannot_serve(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        load_backend(tmp_path / "missing.gguf")
    with pytest.raises(UserError, match="not a .gguf file, a run folder"):
        load_backend(tmp_path)
    with pytest.raises(UserError, match="threads"):
        load_backend(tmp_path, threads=0)


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(repetition_penalty=0)]
)
def test_generation_params_are_validated(bad):
    with pytest.raises(UserError):
        GenerationParams(**bad).validate()


@pytest.mark.slow
def test_transformers_backend_streams_and_stops_at_eos(base_hf_dir):
    backend = load_backend(base_hf_dir, threads=1)
    assert backend.kind == "transformers"
    pieces = list(backend.stream_chat(QUESTION, GREEDY))
    assert len(pieces) > 1  # streamed, not one blob
    answer = "".join(pieces)
    assert "Paris" in answer and "<|im_end|>" not in answer
    n_tokens = len(backend.tokenizer(answer)["input_ids"])
    assert n_tokens < GREEDY.max_new_tokens  # it stopped at <|im_end|>, not at the token limit


@pytest.mark.slow
def test_transformers_backend_sampling_params(base_hf_dir):
    backend = load_backend(base_hf_dir, threads=1)
    sampled = GenerationParams(temperature=1.2, top_p=0.95, max_new_tokens=12, seed=7)
    first = "".join(backend.stream_chat([{"role": "user", "content": "Tell me a story."}], sampled))
    second = "".join(backend.stream_chat([{"role": "user", "content": "Tell me a story."}], sampled))
    assert first == second  # the seed makes sampling reproducible
    short = "".join(
        backend.stream_chat(
            [{"role": "user", "content": "Tell me a story."}], GenerationParams(max_new_tokens=3, seed=1)
        )
    )
    assert len(backend.tokenizer(short)["input_ids"]) <= 4


@pytest.mark.slow
def test_llama_cpp_backend_matches_transformers_greedy(base_hf_dir, base_f16_gguf):
    hf = load_backend(base_hf_dir, threads=1)
    gguf = load_backend(base_f16_gguf, threads=1)
    assert gguf.kind == "llama.cpp" and gguf.model_id == "base-f16.gguf"
    pieces = list(gguf.stream_chat(QUESTION, GREEDY))
    assert len(pieces) > 1
    # Same template (from the GGUF metadata), same EOS, same weights up to fp16: same greedy answer.
    assert "".join(pieces).strip() == "".join(hf.stream_chat(QUESTION, GREEDY)).strip()


@pytest.mark.slow
def test_llama_cpp_backend_max_tokens_and_seed(base_f16_gguf):
    backend = load_backend(base_f16_gguf, threads=1)
    params = GenerationParams(temperature=1.0, max_new_tokens=5, seed=3)
    first = "".join(backend.stream_chat([{"role": "user", "content": "Tell me a story."}], params))
    second = "".join(backend.stream_chat([{"role": "user", "content": "Tell me a story."}], params))
    assert first == second
    assert len(backend.llm.tokenize(first.encode(), add_bos=False)) <= 6


@pytest.mark.slow
def test_greedy_reply_is_argmax_decoding_and_the_backends_greedy_answer(base_hf_dir):
    """`greedy_reply` (tunelab eval's samples, the domain eval, via `greedy_tokens` the parity check) picks the argmax
    token step by step, as a hand-written loop over plain forwards does, stops at the turn end, and answers what
    the transformers ChatBackend streams at temperature 0."""
    import torch

    from tunelab.models.inference import chat_prompt, greedy_reply, turn_end_ids

    torch.manual_seed(0)
    backend = load_backend(base_hf_dir, threads=1)
    model, tokenizer = backend.model, backend.tokenizer
    text, finished = greedy_reply(model, tokenizer, QUESTION, max_new_tokens=40)

    ids = chat_prompt(tokenizer, QUESTION)["input_ids"]
    eos = turn_end_ids(model, tokenizer)
    new: list[int] = []
    with torch.no_grad():
        while len(new) < 40:
            token = int(
                model(input_ids=torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], dim=1)).logits[0, -1].argmax()
            )
            if token in eos:
                break
            new.append(token)
    assert (text, finished) == (tokenizer.decode(new, skip_special_tokens=True).strip(), len(new) < 40)
    assert finished and "Paris" in text
    assert text == "".join(backend.stream_chat(QUESTION, GREEDY)).strip()
    cut, cut_finished = greedy_reply(model, tokenizer, QUESTION, max_new_tokens=3)
    assert not cut_finished and cut == tokenizer.decode(new[:3], skip_special_tokens=True).strip()
