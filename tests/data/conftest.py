"""Fixtures for the data-stage tests: the embedded SmolLM2 tokenizer with its own and the Llama-3.1 template."""

from __future__ import annotations

import pytest

from tunelab.config import ModelConfig


@pytest.fixture(scope="session")
def chatml_tokenizer():
    from tunelab.models import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def llama_tokenizer():
    from tunelab.models import load_tokenizer

    return load_tokenizer(ModelConfig(chat_template="llama-3.1"))
