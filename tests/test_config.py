"""Config errors are one line naming the key path; overrides reach the right field."""

from __future__ import annotations

import pytest

from tunelab.config import Config, ConfigError, LoraConfig, explain, load_config, parse_override


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
        (
            "data:\n  sources:\n    - {path: a.json, preset: embedded:sharegpt}\n",
            "data.sources.0: give exactly one of `path` or `preset`",
        ),
        (
            "data:\n  sources:\n    - {path: a.json, wieght: 2}\n",
            "data.sources.0.wieght: unknown key (did you mean `weight`?)",
        ),
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
    from tunelab.experiments.quickstart import QUICKSTART_CONFIG

    shipped = sorted(QUICKSTART_CONFIG.parent.glob("*.yaml"))
    assert {p.name for p in shipped} >= {"quickstart.yaml", "llama32-1b-qlora.yaml", "llama32-3b-qlora.yaml"}
    for path in shipped:
        if not path.name.startswith("sweep-"):  # sweep files are checked in tests/experiments/test_study.py
            assert isinstance(load_config(path), Config), path


def all_fields(model=Config, prefix=""):
    """(key path, pydantic field) of every config key, sections included."""
    from typing import get_args

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        yield prefix + name, field
        for inner in (field.annotation, *get_args(field.annotation)):
            for candidate in (inner, *get_args(inner)):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    yield from all_fields(candidate, f"{prefix}{name}.")


def test_every_field_is_described():
    paths = dict(all_fields())
    assert {"data.sources.path", "data.dedup.threshold", "train.lr", "eval.prompts"} <= set(paths)  # the walk is deep
    undescribed = [path for path, field in paths.items() if not (field.description or "").strip()]
    assert undescribed == []


def test_explain_prints_every_description_above_the_resolved_values(tmp_path):
    import yaml

    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n"), ["lora.r=8"])
    text = explain(cfg)
    assert yaml.safe_load(text) == cfg.model_dump(mode="json")  # still the config, as YAML
    for _, field in all_fields():
        assert f"# {field.description}" in text
    lines = text.splitlines()
    assert lines[lines.index("  r: 8") - 1] == f"  # {LoraConfig.model_fields['r'].description}"


def test_config_show_explain_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner().invoke(app, ["config", "show", str(write(tmp_path, "lora:\n  r: 4\n")), "--explain"])
    assert result.exit_code == 0, result.output
    assert "  r: 4" in result.output and f"# {LoraConfig.model_fields['r'].description}" in result.output


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-4", 1e-4),
        ("2E+3", 2000.0),
        ("8", 8),
        ("0.5", 0.5),
        ("true", True),
        ("cosine", "cosine"),
        ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
        ("", ""),
    ],
)
def test_set_and_grid_read_values_through_one_parser(text, value, tmp_path):
    from tunelab.experiments.sweep_file import parse_grid

    _, parsed = parse_override(f"train.lr={text}")
    assert parsed == value and type(parsed) is type(value)
    if text and "," not in text:
        assert parse_grid([f"train.lr={text}"]) == {"train.lr": [value]}


def test_removed_keys_are_unknown():
    for key in ("data.num_proc=2",):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(None, [key])
