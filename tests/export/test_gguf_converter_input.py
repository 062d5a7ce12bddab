"""What llama.cpp's converter is handed for a SentencePiece tokenizer: the merged folder's files plus an
added_tokens.json naming the user-defined pieces (so they stay whole in the GGUF), without touching the folder."""

from __future__ import annotations

import json

from tests.models.test_loading import write_tiny_gguf
from tunelab.export.gguf import converter_input, user_defined_pieces
from tunelab.models.loading import write_sentencepiece_model


def test_user_defined_pieces_go_to_a_side_folder_for_the_converter(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    write_tiny_gguf(tmp_path / "tiny.gguf")
    write_sentencepiece_model(tmp_path / "tiny.gguf", merged / "tokenizer.model")
    (merged / "config.json").write_text("{}")
    before = sorted(p.name for p in merged.iterdir())

    assert user_defined_pieces(merged / "tokenizer.model") == {"\n": 6, "\n\n": 7}
    with converter_input(merged) as model_dir:
        assert model_dir != merged and model_dir.name == merged.name
        assert json.loads((model_dir / "added_tokens.json").read_text()) == {"\n": 6, "\n\n": 7}
        assert (model_dir / "config.json").resolve() == (merged / "config.json").resolve()
        assert (model_dir / "tokenizer.model").read_bytes() == (merged / "tokenizer.model").read_bytes()
    assert not model_dir.exists()
    assert sorted(p.name for p in merged.iterdir()) == before  # transformers never sees an added_tokens.json


def test_folders_without_sentencepiece_pieces_are_converted_as_they_are(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with converter_input(tmp_path) as model_dir:
        assert model_dir == tmp_path


def test_merged_folder_gets_the_base_sentencepiece_model_once(tmp_path):
    from tunelab.export.merge import copy_sentencepiece_model

    base, merged = tmp_path / "base", tmp_path / "merged"
    base.mkdir()
    merged.mkdir()
    assert copy_sentencepiece_model(base, merged) is False and not (merged / "tokenizer.model").exists()  # SmolLM2
    (base / "tokenizer.model").write_bytes(b"spm-proto")
    assert copy_sentencepiece_model(base, merged) is True
    assert (merged / "tokenizer.model").read_bytes() == b"spm-proto"
    (merged / "tokenizer.model").write_bytes(b"the run's own")
    assert copy_sentencepiece_model(base, merged) is False  # never overwrites one the tokenizer saved itself
    assert (merged / "tokenizer.model").read_bytes() == b"the run's own"
