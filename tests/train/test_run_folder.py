"""The run folder: which config changes a resume accepts is declared on the config fields themselves."""

from __future__ import annotations

import pytest

from tunelab.config import Config, TrainConfig, load_config
from tunelab.errors import UserError
from tunelab.train.run_folder import RESUME_SAFE_TRAIN_KEYS, check_run_dir, prepare_run_dir


def resumed_with(tmp_path, override: str):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}"])
    prepare_run_dir(cfg, resume=False, overwrite=False, data_print="rows-v1")
    changed = load_config(None, [f"train.output_dir={tmp_path / 'run'}", override])
    return check_run_dir(changed, resume=True, overwrite=False)


def test_resume_safe_keys_come_from_the_fields():
    marked = {n for n, f in TrainConfig.model_fields.items() if (f.json_schema_extra or {}).get("resume_safe")}
    assert RESUME_SAFE_TRAIN_KEYS == marked
    assert {"save_steps", "threads", "loss_chunk_tokens"} <= marked
    assert not {"lr", "batch_size", "seed", "grad_accum", "max_steps"} & marked  # these change the maths


@pytest.mark.parametrize(
    "override", ["train.save_steps=7", "train.threads=1", "train.loss_chunk_tokens=64", "train.fused_layers=false"]
)
def test_a_resume_safe_change_is_accepted(tmp_path, override):
    assert resumed_with(tmp_path, override) == tmp_path / "run"


@pytest.mark.parametrize(
    "override, named", [("train.lr=1e-3", "train.lr"), ("lora.r=4", "lora.r"), ("train.seed=1", "train.seed")]
)
def test_any_other_change_stops_the_resume_naming_the_key(tmp_path, override, named):
    with pytest.raises(UserError, match=f"different config \\({named}: "):
        resumed_with(tmp_path, override)


def test_prepare_run_dir_sweeps_a_killed_writers_temp_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".summary.json.tmp-abc").write_text("half")
    (run / ".adapter.tmp-xyz").mkdir()
    cfg = Config.model_validate({"train": {"output_dir": str(run)}})
    prepare_run_dir(cfg, resume=True, overwrite=False, data_print="rows-v1")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data.json"]
