"""`tunelab sweep SWEEP.yaml` (and `tunelab sweep CONFIG --grid ...`, a sweep spec built from a config by
`sweep_file.grid_sweep`): train, export and judge every run of a sweep on the same held-out sets.

Per run, in its own folder (each step is skipped when its output is already there, so re-running the
command skips finished runs and resumes an interrupted one where it stopped):
  train (tunelab.train.recipe, resumes from checkpoints) -> held-out loss on the sweep's fixed general and
  travel sets (eval/heldout.json; no travel set when `heldout.travel` is empty) -> GGUF export (`quant`, q4_k_m
  by default) -> travel rubric base vs tuned, decoded as the app's planner decodes by default
  (eval/travel-grammar.json; eval/travel.json without the grammar; -<quant> for another type) -> CPU latency of
  that GGUF (eval/latency.json, likewise) -> sweep-result.json.
The held-out sets are the validation split of the sweep's `heldout` sources. The split is decided by each
conversation's content hash (tunelab.data.split), so with the same `data.val_fraction` no run trains on them,
whatever its own sources, dedup or weights; the sweep refuses runs that change `data.val_fraction`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.config import Config, ConfigError, load_config
from tunelab.errors import UserError
from tunelab.experiments.sweep_file import (
    PlannedRun,
    SweepSpec,
    as_set_items,
    grid_sweep,
    load_sweep,
    planned_runs,
    with_threads,
)

RESULT_FILE = "sweep-result.json"
PLAN_FILE = "sweep.yaml"  # the spec a sweep folder was run under, as JSON (valid YAML)


def run_config_for(spec: SweepSpec, spec_dir: Path, run: PlannedRun, output: Path) -> Config:
    return load_config(
        _base_path(spec, spec_dir), [*spec.set, *as_set_items(run.overrides), f"train.output_dir={output / run.name}"]
    )


def _base_path(spec: SweepSpec, spec_dir: Path) -> Path:
    base = Path(spec.base)
    if base.is_absolute():
        return base
    return spec_dir / base


def sweep_output(spec: SweepSpec, spec_dir: Path) -> Path:
    if spec.output:
        return Path(spec.output)
    return Path(f"{load_config(_base_path(spec, spec_dir), spec.set).train.output_dir.rstrip('/')}-sweep")


def check_requirements(spec: SweepSpec) -> None:
    """`requires: [cuda, hub]` fails before anything is trained, with one line saying what is missing."""
    import torch

    if "cuda" in spec.requires and not torch.cuda.is_available():
        raise ConfigError("sweep: this sweep needs a CUDA GPU (requires: cuda) and this machine has none")
    if "hub" in spec.requires:
        import socket

        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError:
            raise ConfigError(
                "sweep: this sweep downloads models from the Hugging Face Hub (requires: hub), which is unreachable"
            ) from None


def run_study(sweep_file: str | Path, output: Path | None = None, log=print, threads: int | None = None) -> list[dict]:
    """`tunelab sweep SWEEP.yaml`."""
    spec, spec_dir = load_sweep(sweep_file)
    return run_sweep(with_threads(spec, threads), spec_dir, output, log)


def run_grid(
    config: str | Path,
    grid_items: list[str],
    overrides: list[str] | None = None,
    output: Path | None = None,
    log=print,
    threads: int | None = None,
) -> list[dict]:
    """`tunelab sweep CONFIG --grid key=v1,v2 ...`: the sweep `grid_sweep` builds, run like a sweep file."""
    spec, spec_dir = grid_sweep(config, grid_items, overrides)
    return run_sweep(with_threads(spec, threads), spec_dir, output, log)


def run_sweep(spec: SweepSpec, spec_dir: Path, output: Path | None = None, log=print) -> list[dict]:
    """Every planned run of `spec` (relative paths in it are resolved against `spec_dir`), each skipped when
    finished earlier; writes OUTPUT/sweep.yaml (the spec run), the run folders and the report."""
    from tunelab.experiments.results import write_report

    check_requirements(spec)
    runs = planned_runs(spec)
    output = Path(output or sweep_output(spec, spec_dir))
    base_cfg = load_config(_base_path(spec, spec_dir), spec.set)
    configs = {
        run.name: run_config_for(spec, spec_dir, run, output) for run in runs
    }  # validate all before training any
    for name, cfg in configs.items():
        if cfg.model.name.startswith(
            "embedded:"
        ):  # a missing embedded model fails now, not after hours of earlier runs
            from tunelab.models.loading import embedded_gguf_path

            embedded_gguf_path(cfg.model.name.split(":", 1)[1])
        if cfg.data.val_fraction != base_cfg.data.val_fraction:
            raise ConfigError(
                f"sweep run {name}: data.val_fraction must stay {base_cfg.data.val_fraction} "
                "(the fixed held-out sets depend on it)"
            )
    refuse_mixed_runs(output, spec, runs)
    output.mkdir(parents=True, exist_ok=True)
    (output / PLAN_FILE).write_text(spec.model_dump_json(indent=2))
    log(f"sweep: {len(runs)} runs into {output}")
    results = []
    for i, run in enumerate(runs, 1):
        run_dir = output / run.name
        done = run_dir / RESULT_FILE
        if done.is_file():
            log(f"[{i}/{len(runs)}] {run.name}: finished earlier, skipped")
            results.append(json.loads(done.read_text()))
            continue
        log(f"[{i}/{len(runs)}] {run.name}")
        results.append(run_one(spec, spec_dir, run, configs[run.name], output, log, base_cfg))
        write_report(output, results_from_runs(output, runs))
    write_report(output, results_from_runs(output, runs))
    return results


# What every run of a sweep is trained and judged with; the grid and the runs may grow between invocations.
SHARED_BY_ALL_RUNS = ("base", "set", "heldout", "travel_eval", "export", "quant", "latency")


def refuse_mixed_runs(output: Path, spec: SweepSpec, runs: list[PlannedRun]) -> None:
    """A sweep folder resumed under a sweep file that trains or judges otherwise (another `travel_eval.limit`,
    held-out set, ...), or with a finished run's own settings changed, would mix two judges in one table: refused,
    naming what differs, before anything is written."""
    previous_file = output / PLAN_FILE
    if previous_file.is_file():
        previous, current = json.loads(previous_file.read_text()), json.loads(spec.model_dump_json())
        differs = [key for key in SHARED_BY_ALL_RUNS if previous.get(key) != current.get(key)]
        if differs:
            raise UserError(
                f"{output}: its runs were made under another sweep file (it differs in {', '.join(differs)}; see "
                f"{previous_file}); give another --output, or delete the folder to start again"
            )
    for run in runs:
        done = output / run.name / RESULT_FILE
        if done.is_file() and (finished := json.loads(done.read_text()).get("overrides")) != run.overrides:
            raise UserError(
                f"{done}: run {run.name} finished earlier with other settings ({finished}, now {run.overrides}); "
                "delete that file to run it again, or give another --output"
            )


def results_from_runs(output: Path, runs: list[PlannedRun] | None = None) -> list[dict]:
    """Every finished run's result, in sweep order: of `runs`, else of the plan OUTPUT/sweep.yaml records (so
    `tunelab report` rebuilds the tables the sweep wrote), else in folder-name order."""
    recorded = output / PLAN_FILE
    if runs is None and recorded.is_file():
        try:
            runs = planned_runs(SweepSpec.model_validate_json(recorded.read_text()))
        except ValueError:  # a plan recorded under an older sweep schema: only the rows' order depends on it
            runs = None
    folders = (
        [output / r.name for r in runs]
        if runs is not None
        else sorted(p.parent for p in output.glob(f"*/{RESULT_FILE}"))
    )
    return [json.loads((f / RESULT_FILE).read_text()) for f in folders if (f / RESULT_FILE).is_file()]


def run_one(spec: SweepSpec, spec_dir: Path, run: PlannedRun, cfg: Config, output: Path, log, base_cfg: Config) -> dict:
    from tunelab.experiments.travel_eval import domain_eval_name, quant_suffix
    from tunelab.io import atomic_write
    from tunelab.train.recipe import run_training

    run_dir = Path(cfg.train.output_dir)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file() and json.loads(summary_file.read_text()).get("steps") == cfg.train.max_steps:
        summary = json.loads(summary_file.read_text())
        log(f"  trained earlier ({summary['steps']} steps)")
    else:
        summary = run_training(cfg, resume=True, log=log)
    heldout = _cached(
        run_dir / "eval" / "heldout.json", lambda: heldout_losses(run_dir, cfg, spec, base_cfg), log, "held-out loss"
    )
    gguf = None
    if spec.export:
        gguf = run_dir / "export" / f"model-{spec.quant}.gguf"
        if not gguf.is_file():
            from tunelab.export.pipeline import export_run

            export_run(run_dir, [spec.quant], threads=spec.latency.threads)
    suffix = quant_suffix(spec.quant)  # a run judged from two types keeps both
    travel = None
    if spec.travel_eval.enabled:
        # Named as `tunelab eval` names it (decoding and type); a folder judged otherwise is refused earlier.
        judged_as = domain_eval_name("travel", spec.travel_decoding.day_grammar, spec.quant)
        travel = _cached(
            run_dir / "eval" / f"{judged_as}.json",
            lambda: _travel_eval(spec, spec_dir, run_dir, cfg, output, log),
            log,
            "travel eval",
        )
    latency = None
    if gguf is not None:
        latency = _cached(
            run_dir / "eval" / f"latency{suffix}.json", lambda: cpu_latency(gguf, spec), log, "CPU latency"
        )
    result = collect(run, cfg, run_dir, summary, heldout, travel, latency, spec.quant)
    atomic_write(run_dir / RESULT_FILE, json.dumps(result, indent=2))
    return result


def _cached(path: Path, compute, log, what: str) -> dict:
    from tunelab.io import atomic_write

    if path.is_file():
        log(f"  {what}: done earlier ({path})")
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(value, indent=2, ensure_ascii=False))
    return value


def _travel_eval(spec: SweepSpec, spec_dir: Path, run_dir: Path, cfg: Config, output: Path, log) -> dict:
    from tunelab.experiments.travel_eval import run_domain_eval

    prompts = spec.travel_eval.prompts
    if prompts != "travel" and not Path(prompts).is_absolute():
        prompts = str(spec_dir / prompts)
    # One base GGUF per base model for the whole sweep: runs of the same model compare against the same file.
    slug = "".join(c if c.isalnum() else "-" for c in cfg.model.name)
    return run_domain_eval(
        run_dir,
        prompts,
        spec.travel_decoding,
        limit=spec.travel_eval.limit,
        gguf=spec.export,
        adapter=not spec.export,
        threads=spec.latency.threads,
        log=log,
        base_gguf=output / "base-models" / f"{slug}-{spec.quant}.gguf",
        quant=spec.quant,
    )


# --------------------------------------------------------------------------------- measurements
def heldout_sets(cfg: Config, spec: SweepSpec, base_cfg: Config) -> dict[str, Path]:
    """Prepared datasets whose val splits are the sweep's fixed held-out sets: tokenised with this run's model and
    template, but selected, cleaned and cut with the sweep's base data settings — a run that turns dedup or
    normalisation off, or changes the sequence length, is judged on the same conversations as every other run."""
    from tunelab.config import config_from_dict
    from tunelab.data.prepare import prepare_dataset

    folders = {}
    for name, sources in (("general", spec.heldout.general), ("travel", spec.heldout.travel)):
        if not sources:
            continue
        raw = cfg.model_dump(mode="json")
        raw["data"] = base_cfg.data.model_dump(mode="json")
        raw["train"]["max_seq_len"] = base_cfg.train.max_seq_len
        raw["train"]["objective"] = base_cfg.train.objective
        raw["data"]["sources"] = [s.model_dump(mode="json") for s in sources]
        raw["data"]["output_dir"] = None  # the cache, keyed by this config: shared by runs with the same model
        folders[name] = prepare_dataset(config_from_dict(raw, f"heldout.{name}"))
    return folders


def heldout_losses(run_dir: Path, cfg: Config, spec: SweepSpec, base_cfg: Config) -> dict:
    """Assistant-token loss of base and tuned on each fixed held-out set (the trainer's own loss), with the number
    and a digest of the rows scored (equal digests: the same tokenised conversations)."""
    import torch

    from tunelab.data.prepare import load_prepared
    from tunelab.models.runs import load_run_model
    from tunelab.train.heldout import heldout_loss_per_adapter
    from tunelab.train.precision import precision_for_this_machine
    from tunelab.train.recipe import rows_of

    precision = precision_for_this_machine(cfg.train.precision, "cpu")
    model, tokenizer = load_run_model(run_dir, dtype=precision.dtype)
    losses = {}
    for name, folder in heldout_sets(cfg, spec, base_cfg).items():
        rows = rows_of(load_prepared(folder)[1])[: spec.heldout.max_rows]
        scored = heldout_loss_per_adapter(
            model,
            rows,
            batch_size=cfg.eval.batch_size,
            pad_id=tokenizer.pad_token_id,
            precision=precision,
            device=torch.device("cpu"),
            chunk_tokens=cfg.train.loss_chunk_tokens,
        )
        losses[name] = {
            "rows": len(rows),
            "rows_sha256": rows_digest(rows),
            "base": scored["base"],
            "tuned": scored["tuned"],
        }
    return losses


def rows_digest(rows) -> str:
    """SHA-256 of (input_ids, labels) rows in order."""
    import hashlib

    digest = hashlib.sha256()
    for input_ids, labels in rows:
        digest.update(json.dumps([list(input_ids), list(labels)]).encode())
    return digest.hexdigest()


def cpu_latency(gguf: Path, spec: SweepSpec) -> dict:
    """TTFT and decode tokens/s of the exported GGUF through the app's backend (the inference benchmark's code)."""
    from tunelab.bench.infer import measure_model

    return measure_model(str(gguf), spec.latency.threads, spec.latency.max_new_tokens, spec.latency.repeats)


def adapter_facts(run_dir: Path) -> dict:
    from safetensors import safe_open

    file = run_dir / "adapter" / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        params = sum(_numel(f.get_slice(key).get_shape()) for key in f.keys())
    return {"trainable_params": params, "adapter_mib": round(file.stat().st_size / 2**20, 2)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def curves(run_dir: Path) -> dict:
    """Train loss per step and the run's own val loss per evaluation, from metrics.jsonl."""
    train, val = [], []
    file = run_dir / "metrics.jsonl"
    for line in file.read_text().splitlines() if file.is_file() else []:
        record = json.loads(line)
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
        elif "loss" in record:
            train.append((record["step"], record["loss"]))
    return {"train": train, "val": val}


def collect(
    run: PlannedRun,
    cfg: Config,
    run_dir: Path,
    summary: dict,
    heldout: dict,
    travel: dict | None,
    latency: dict | None,
    quant: str = "q4_k_m",
) -> dict:
    curve = curves(run_dir)
    result = {
        "name": run.name,
        "run_dir": str(run_dir),
        "overrides": run.overrides,
        "model": cfg.model.name,
        "final_train_loss": summary.get("final_train_loss"),
        "own_val_loss_final": summary.get("final_val_loss"),
        "own_val_loss_best": min((v for _, v in curve["val"]), default=None),
        **{f"{name}_val_loss_{side}": heldout[name][side] for name in heldout for side in ("base", "tuned")},
        "train_seconds": summary.get("train_seconds"),
        "train_tok_per_s": summary.get("tokens_per_second"),
        "peak_rss_mib": summary.get("peak_rss_mib"),
        **adapter_facts(run_dir),
        "curves": curve,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if travel:
        pair = travel["pairs"].get("gguf") or travel["pairs"].get("adapter")
        result.update(
            {
                "travel_source": f"gguf-{quant}" if "gguf" in travel["pairs"] else "adapter",
                "travel_prompts": len(pair["answers"]),
                "travel_score_base": pair["mean_score"]["base"],
                "travel_score_tuned": pair["mean_score"]["tuned"],
                "travel_wins": pair["wins"],
                "travel_ties": pair["ties"],
                "travel_losses": pair["losses"],
                "travel_win_rate": pair["win_rate_non_tied"],
                "travel_win_rate_interval": pair.get("win_rate_interval"),
                "travel_score_difference_interval": pair.get("mean_difference_interval"),
                "travel_sign_test_p": pair.get("sign_test_p"),
                "travel_verdict": pair.get("verdict"),
                "travel_days_honoured_tuned": pair["criteria"]["days_honoured"]["tuned"],
            }
        )
    if latency:
        result.update(
            {
                "cpu_ttft_s": latency.get("ttft_s"),
                "cpu_decode_tok_s": latency.get("decode_tok_s"),
                "gguf_mib": latency.get("size_mib"),
                "latency_quant": quant,
            }
        )
    return result
