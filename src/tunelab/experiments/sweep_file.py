"""A sweep file (`tunelab sweep SWEEP.yaml`): a base config, the runs (a grid or an explicit list), and what
judges them.

    base: quickstart.yaml            # relative to the sweep file
    output: runs/sweep-lr-rank       # one folder per run inside
    set: [train.max_steps=60]        # overrides for every run
    grid:                            # the product of the axes; an axis of mappings sets several keys at once
      train.lr: [2.0e-4, 5.0e-5]
      rank: [{lora.r: 16, lora.alpha: 32}, {lora.r: 64, lora.alpha: 128}]
    runs:                            # or/and explicit runs: a name and overrides on any key
      - {name: no-dedup, set: {data.dedup.exact: false, data.dedup.near: false}}
    heldout: {...}                   # the fixed held-out sets every run is judged on (HeldoutSpec)

Every run folder is a plain `tunelab train` run folder plus eval/ outputs and `sweep-result.json`.

`tunelab sweep CONFIG --grid train.lr=1e-4,2e-4 --grid lora.r=8,16 [--set key=value]` is a shortcut for the sweep
file `grid_sweep` builds: CONFIG as the base, the grid, and the held-out set fixed to CONFIG's own validation split
(its data sources under its data settings), with no travel set, no export and no travel eval.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.config import ConfigError, SourceConfig, load_config, parse_value
from tunelab.models.inference import GenerationParams
from tunelab.serve.limits import PLANNER_DAY_FORMAT

TRAVEL_KEYWORDS = ["travel", "trip", "itinerary", "vacation", "tourist", "sightseeing", "things to do in"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeldoutSpec(_Spec):
    general: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(preset="embedded:sharegpt", max_records=2000)],
        description="Sources whose validation split is the general held-out set (the same for every run).",
    )
    travel: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(preset="embedded:sharegpt", keywords=TRAVEL_KEYWORDS)],
        description="Sources whose validation split is the travel held-out set (the same for every run; [] for none).",
    )
    max_rows: int | None = Field(64, gt=0, description="Conversations scored per held-out set (None: all).")


class TravelEvalSpec(_Spec):
    prompts: str = Field(
        "travel", description="`travel` (the shipped set) or a JSONL prompt file, relative to the sweep file."
    )
    limit: int | None = Field(12, gt=0, description="Only the first N prompts (None: all); bounds CPU time per run.")
    max_new_tokens: int = Field(
        256, gt=0, description="New tokens per answer (a prompt under the day-plan grammar: the grammar's budget)."
    )
    day_grammar: bool = Field(
        PLANNER_DAY_FORMAT,
        description="Decode the GGUFs under the day-plan grammar, as the app's Travel Planner does by default "
        "(`export` runs only: the adapter comparison cannot take a grammar).",
    )
    repetition_penalty: float = Field(
        GenerationParams.repetition_penalty, gt=0, description="Repetition penalty of every answer (the app's)."
    )
    samples: int = Field(
        0,
        ge=0,
        description="Sampled answers per prompt and side besides the greedy one (the app's temperature, fixed "
        "seeds); a prompt scores the mean of its answers.",
    )
    enabled: bool = Field(True, description="Score the travel rubric (base vs tuned) for every run.")


class LatencySpec(_Spec):
    threads: int = Field(2, gt=0, description="llama.cpp threads for the CPU latency of the exported GGUF.")
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per latency prompt.")
    repeats: int = Field(2, gt=0, description="Repeats per prompt; the first is a warm-up when > 1.")


class SweepSpec(_Spec):
    base: str = Field(description="Base YAML config, relative to the sweep file (or absolute).")
    output: str | None = Field(
        None, description="Sweep folder, relative to the working directory (default: <base output_dir>-sweep)."
    )
    set: list[str] = Field(default_factory=list, description="Overrides (key.path=value) applied to every run.")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Axes whose product gives runs; a value may be a mapping of several keys."
    )
    runs: list[dict[str, Any]] = Field(
        default_factory=list, description="Explicit runs: {name, set: {key.path: value}}."
    )
    heldout: HeldoutSpec = Field(default_factory=HeldoutSpec, description="The held-out sets every run is judged on.")
    travel_eval: TravelEvalSpec = Field(
        default_factory=TravelEvalSpec, description="The travel rubric eval of every run."
    )
    export: bool = Field(
        True,
        description="Export a GGUF per run (type `quant`); "
        "the travel eval then uses the GGUFs and CPU latency is measured.",
    )
    quant: str = Field(
        "q4_k_m",
        description="GGUF type exported, judged and timed per run: q4_k_m is what the app serves; "
        "q8_0 keeps more of a small fine-tune (q4_k_m rounded a 30-step Gemma-3-270M fine-tune away).",
    )
    latency: LatencySpec = Field(default_factory=LatencySpec, description="CPU latency settings for the exported GGUF.")
    requires: list[str] = Field(default_factory=list, description="`cuda` and/or `hub`: refuse to start without them.")

    @property
    def travel_decoding(self):
        """How the travel eval decodes (`eval.domain.Decoding`): under the day-plan grammar only when GGUFs are judged
        (the adapter comparison decodes in transformers, which has no grammar). The eval and its cache file's name
        both read this, so a result is never cached under another decoding's name."""
        from tunelab.eval.domain import Decoding

        return Decoding(
            max_new_tokens=self.travel_eval.max_new_tokens,
            repetition_penalty=self.travel_eval.repetition_penalty,
            day_grammar=self.travel_eval.day_grammar and self.export,
            samples=self.travel_eval.samples,
        )


def with_threads(spec: SweepSpec, threads: int | None) -> SweepSpec:
    """`spec` with every run's CPU threads pinned to `threads`: training (`train.threads`), llama.cpp judging and the
    latency measurement (`latency.threads`). Two sweeps sharing a machine each get their own cores this way; more
    threads than free cores make llama.cpp's spinning threads wait on each other."""
    if threads is None:
        return spec
    return spec.model_copy(
        update={
            "set": [*spec.set, f"train.threads={threads}"],
            "latency": spec.latency.model_copy(update={"threads": threads}),
        }
    )


class PlannedRun(BaseModel):
    name: str
    overrides: dict[str, Any]  # key.path -> value, on top of the base config and `set`


def load_sweep(path: str | Path) -> tuple[SweepSpec, Path]:
    """The validated spec and the folder relative paths in it are resolved against."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `base` and `grid` or `runs`")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    if not spec.grid and not spec.runs:
        raise ConfigError(f"{path}: give `grid` or `runs` (or both)")
    return spec, path.resolve().parent


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`--grid` items -> a sweep grid:
    ["train.lr=1e-4,2e-4", "lora.r=8"] -> {"train.lr": [1e-4, 2e-4], "lora.r": [8]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item}: expected key.path=v1,v2,...")
        if key in grid:
            raise ConfigError(f"--grid {item}: `{key}` is given twice")
        grid[key] = [parse_value(v.strip()) for v in values.split(",")]
    return grid


def grid_sweep(config: str | Path, grid_items: list[str], overrides: list[str] | None = None) -> tuple[SweepSpec, Path]:
    """The sweep `tunelab sweep CONFIG --grid ...` runs, and the folder its paths are resolved against: every run is
    judged on CONFIG's own validation split (with `overrides`), whatever the grid changes in a run's data."""
    if not grid_items:
        raise ConfigError("sweep: give at least one --grid key.path=v1,v2")
    config = Path(config).resolve()
    base = load_config(config, overrides or [])
    spec = SweepSpec(
        base=str(config),
        set=list(overrides or []),
        grid=parse_grid(grid_items),
        heldout=HeldoutSpec(general=base.data.sources, travel=[], max_rows=base.eval.max_val_rows),
        travel_eval=TravelEvalSpec(enabled=False),
        export=False,
    )
    return spec, config.parent


def planned_runs(spec: SweepSpec) -> list[PlannedRun]:
    runs = [PlannedRun(name=name, overrides=overrides) for name, overrides in _grid_runs(spec.grid)]
    for i, item in enumerate(spec.runs):
        overrides = item.get("set") or {}
        if not isinstance(overrides, dict) or set(item) - {"name", "set"}:
            raise ConfigError(f"runs.{i}: expected {{name: ..., set: {{key.path: value}}}}")
        runs.append(PlannedRun(name=str(item.get("name") or run_name(overrides) or f"run-{i}"), overrides=overrides))
    names = [r.name for r in runs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"sweep: two runs are named `{duplicate}`; give them distinct names")
    return runs


def _grid_runs(grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    if not grid:
        return []
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{axis}: expected a non-empty list of values")
    out = []
    for combo in itertools.product(*grid.values()):
        overrides: dict[str, Any] = {}
        for axis, value in zip(grid, combo):
            overrides.update(value if isinstance(value, dict) else {axis: value})
        out.append((run_name(overrides), overrides))
    return out


def run_name(overrides: dict[str, Any]) -> str:
    """{"train.lr": 5e-05, "lora.r": 16} -> "lr-5e-05_r-16" (folder-safe)."""
    return (
        "_".join(f"{key.split('.')[-1]}-{value}" for key, value in overrides.items()).replace("/", "-").replace(" ", "")
    )


def as_set_items(overrides: dict[str, Any]) -> list[str]:
    """Overrides as `--set` strings; values are written as YAML so lists and mappings survive."""
    return [
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in overrides.items()
    ]
