"""`tunelab eval RUN --lm-eval TASKS`: EleutherAI lm-eval harness tasks on the base and the tuned model, side by side.

Optional: lm-eval (`pip install "tunelab[lm-eval]"`, pinned to 0.4.13) is used when it is installed; without it
`tunelab eval` says so in one line and does the rest of its work.

TASKS is comma separated; each item is an lm-eval task, group or tag name, a task YAML file, or a folder of task
YAMLs (lm-eval's `include_path`: every task defined in it runs, and its names resolve for the other items).
Tasks are loaded before any model, so a task whose data cannot be fetched (the Hub offline, a missing local file)
costs no model load: it is named in one line and skipped; when no requested task is left, that line is a UserError.

Both models come from one load of the run, as in the held-out eval (tunelab.eval.evaluate): the run's base model
with its LoRA adapter on (tuned) and off (base), in fp32 on the CPU, handed to lm-eval in memory
(`HFLM(pretrained=model, tokenizer=tokenizer)`): the same weights underneath, no Hub id, no second copy.
The report goes to RUN/eval/lm-eval.json and is printed as a table: per task and metric, base, tuned, the difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import UserError
from tunelab.io import atomic_write

LM_EVAL_VERSION = "0.4.13"
INSTALL = f'pip install "lm-eval=={LM_EVAL_VERSION}"  (or: pip install "tunelab[lm-eval]")'
BOOTSTRAP_ITERS = 1000  # stderr of metrics without a closed form (lm-eval's own default, 100000, is slow on a CPU)


def lm_eval_missing() -> str | None:
    """None when lm-eval can be imported, else the one line saying it is not and how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return f"lm-eval harness tasks skipped: lm-eval is not installed ({INSTALL})"
    return None


@dataclass
class HarnessTasks:
    """The requested tasks, loaded (their data included) and ready for both models."""

    spec: str
    manager: (
        object  # the lm-eval TaskManager that loaded them (simple_evaluate would otherwise scan its built-ins again)
    )
    objects: list = field(default_factory=list)  # lm-eval Task and Group objects, one or more per requested item
    names: list[str] = field(default_factory=list)  # the requested items that loaded
    skipped: dict[str, str] = field(default_factory=dict)  # requested item -> why it could not be loaded


def parse_task_spec(spec: str) -> tuple[list[str], list[Path]]:
    """(items, include paths): folders among the items, and the folders of YAML files, are include paths."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise UserError("--lm-eval: give one or more task names or task YAML files/folders, comma separated")
    include: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        folder = path if path.is_dir() else path.parent if path.suffix in (".yaml", ".yml") and path.is_file() else None
        if folder is not None and folder.resolve() not in include:
            include.append(folder.resolve())
    return items, include


def load_tasks(spec: str, log=print) -> HarnessTasks | None:
    """Load every requested task with its data; None (after one line) when lm-eval is not installed.

    A task that does not load is named in one line and skipped; none left: UserError."""
    missing = lm_eval_missing()
    if missing:
        log(missing)
        return None
    from lm_eval.tasks import TaskManager

    items, include = parse_task_spec(spec)
    needs_builtins = any(
        not Path(item).expanduser().exists() for item in items
    )  # the built-in index takes ~10 s to scan
    manager = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=needs_builtins)
    tasks = HarnessTasks(spec, manager)
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            requested = TaskManager(include_path=str(path.resolve()), include_defaults=False).all_subtasks
            if not requested:
                tasks.skipped[item] = "no lm-eval task YAML in this folder"
                continue
        else:
            requested = [str(path.resolve()) if path.is_file() else item]
        try:
            tasks.objects += [_top_level(manager.load([name])) for name in requested]
        except Exception as exc:  # lm-eval and datasets raise anything from KeyError to ConnectionError here
            tasks.skipped[item] = _reason(exc)
            continue
        tasks.names.append(item)
    if not tasks.names:  # nothing left to run: one error line (exit code 2), naming each task
        raise UserError("; ".join(f"lm-eval task {item}: {reason}" for item, reason in tasks.skipped.items()))
    for item, reason in tasks.skipped.items():
        log(f"lm-eval task {item}: skipped, {reason}")
    return tasks


def _top_level(loaded: dict):
    """What one requested name loaded: its top group (so lm-eval reports the group's aggregate too), or its task(s)."""
    children = {child for names in loaded["group_map"].values() for child in names}
    groups = [group for name, group in loaded["groups"].items() if name not in children]
    if len(groups) == 1:
        return groups[0]
    return list(loaded["tasks"].values())  # a task (one), a tag (several)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, KeyError):
        return f"not an lm-eval task, group or tag name, nor a task YAML file or folder ({text})"
    if isinstance(exc, (ConnectionError, OSError, TimeoutError)) or "offline" in text.lower() or "hub" in text.lower():
        return f"its data could not be fetched ({type(exc).__name__}: {text})"
    return f"it could not be loaded ({type(exc).__name__}: {text})"


def _flat(objects: list) -> list:
    """One list of Tasks and Groups, each once (a YAML file and its folder may both be asked for)."""
    flat: dict[str, object] = {}
    for obj in objects:
        for item in obj if isinstance(obj, list) else [obj]:
            flat.setdefault(getattr(item, "task_name", None) or item.name, item)
    return list(flat.values())


def evaluate_with_lm_eval(model, tokenizer, tasks: HarnessTasks, limit: int | None = None, batch_size: int = 8) -> dict:
    """lm-eval's results for one in-memory model: {task or group name: {metric: value, ...}} plus samples counted."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=_flat(tasks.objects),
        task_manager=tasks.manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    return {"results": out["results"], "n_samples": out.get("n-samples", {})}


def run_lm_eval(
    run_dir: str | Path, tasks: HarnessTasks, limit: int | None = None, threads: int | None = None, log=print
) -> dict:
    """Base vs tuned on the loaded tasks; writes RUN/eval/lm-eval.json and prints the side-by-side table."""
    from tunelab.models.runs import load_run_model, run_config
    from tunelab.train.recipe import set_threads

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    set_threads(threads or cfg.train.threads)  # None: every core this process may use
    # fp32 on the CPU; a QLoRA run's 4-bit base is dequantised, what its adapter was trained on (see load_run_model).
    model, tokenizer = load_run_model(run_dir, cfg=cfg)
    inner = model.get_base_model()  # the transformers model with the LoRA layers in it: lm-eval wants a PreTrainedModel
    log(f"lm-eval {', '.join(tasks.names)}{f' (first {limit} documents each)' if limit else ''}: tuned (adapter on)")
    tuned = evaluate_with_lm_eval(inner, tokenizer, tasks, limit, cfg.eval.batch_size)
    log("lm-eval: base (adapter off)")
    with model.disable_adapter():
        base = evaluate_with_lm_eval(inner, tokenizer, tasks, limit, cfg.eval.batch_size)
    report = {
        "run_dir": str(run_dir),
        "base_model": cfg.model.name,
        "lm_eval_version": _version(),
        "tasks_requested": tasks.spec,
        "limit": limit,
        "skipped": tasks.skipped,
        "results": side_by_side(base, tuned),
    }
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    atomic_write(out / "lm-eval.json", json.dumps(report, indent=2, ensure_ascii=False))
    log(format_table(report) + f"\nlm-eval report: {out / 'lm-eval.json'}")
    return report


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def side_by_side(base: dict, tuned: dict) -> dict:
    """{task: {"samples": n, "metrics": {"acc,none": {"base", "tuned", "base_stderr", "tuned_stderr"}}}}."""
    table = {}
    for task, tuned_row in tuned["results"].items():
        base_row = base["results"].get(task, {})
        metrics = {}
        for key, value in tuned_row.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = f"{metric}_stderr,{filter_name}"
            metrics[key] = {
                "base": _number(base_row.get(key)),
                "tuned": _number(value),
                "base_stderr": _number(base_row.get(stderr)),
                "tuned_stderr": _number(tuned_row.get(stderr)),
            }
        samples = tuned["n_samples"].get(task, {}).get("effective")
        table[task] = {"samples": samples, "metrics": metrics}
    return table


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def format_table(report: dict) -> str:
    rows = [("task", "metric", "n", "base", "tuned", "tuned - base")]
    for task, row in report["results"].items():
        for metric, v in row["metrics"].items():
            delta = v["tuned"] - v["base"] if v["base"] is not None and v["tuned"] is not None else None
            rows.append(
                (
                    task,
                    metric.removesuffix(",none"),
                    "" if row["samples"] is None else str(row["samples"]),
                    _cell(v["base"], v["base_stderr"]),
                    _cell(v["tuned"], v["tuned_stderr"]),
                    "—" if delta is None else f"{delta:+.4f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for item, reason in report["skipped"].items():
        lines.append(f"skipped: {item} ({reason})")
    return "\n".join(lines)


def _cell(value, stderr) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
