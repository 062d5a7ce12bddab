"""Config errors are one line naming the key path; overrides reach the right field."""

from __future__ import annotations

import pytest

from tunelab.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  lr: 0\n", "train.lr: must be > 0"),
        ("train:\n  lr: -1e-4\n", "train.lr: must be > 0"),
        ("lora:\n  r: 0\n", "lora.r: must be > 0"),
        ("lora:\n  alpha: -2\n", "lora.alpha: must be > 0"),
        ("train:\n  max_steps: 0\n", "train.max_steps: must be > 0"),
        ("train:\n  max_stpes: 10\n", "train.max_stpes: unknown key (did you mean `max_steps`?)"),
        ("trian:\n  lr: 1\n", "trian: unknown key (did you mean `train`?)"),
        ("train:\n  batch_size: four\n", "train.batch_size: Input should be a valid integer"),
        ("train:\n  precision: fp8\n", "train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ("data:\n  sources:\n    - {path: a.json, preset: embedded:sharegpt}\n", "data.sources.0: give exactly one of `path` or `preset`"),
        ("data:\n  sources:\n    - {path: a.json, wieght: 2}\n", "data.sources.0.wieght: unknown key (did you mean `weight`?)"),
    ],
)
def test_bad_values_name_the_key_path(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n"), ["train.lr=1e-4", "lora.r=8", "train.packing=false"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 8 and cfg.train.packing is False
    cfg = load_config(None, ["data.sources.0.max_records=10"])
    assert cfg.data.sources[0].max_records == 10
    with pytest.raises(ConfigError, match="train.lr: must be > 0"):
        load_config(None, ["train.lr=0"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["train.lr"])


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in (Path(__file__).parent.parent / "configs").glob("*.yaml"):
        load_config(path)
