"""`tunelab sweep CONFIG --grid train.lr=1e-4,2e-4 --grid lora.r=8,16`: one run per grid point, ranked by held-out loss.

Each grid point is a full `tunelab train` run (tunelab.train.recipe.run_training) in `OUTPUT/<point name>/`,
then `tunelab eval` without samples (tunelab.eval.evaluate.evaluate_run). Runs are judged by the held-out
assistant-token loss of the tuned adapter, never by training loss. A point whose run folder already holds a
finished run is resumed (i.e. skipped), so an interrupted sweep continues where it stopped.
Results: OUTPUT/sweep.json, OUTPUT/sweep.md and OUTPUT/sweep.png.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from tunelab.config import ConfigError, load_config, parse_value


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """["train.lr=1e-4,2e-4", "lora.r=8,16"] -> [("train.lr", [1e-4, 2e-4]), ("lora.r", [8, 16])]."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item}: expected key.path=v1,v2,...")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {item}: `{key}` is given twice")
        grid.append((key, [parse_value(v.strip()) for v in values.split(",")]))
    return grid


def grid_points(grid: list[tuple[str, list]]) -> list[dict]:
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in grid))]


def point_name(point: dict) -> str:
    return "_".join(f"{key.split('.')[-1]}-{value}" for key, value in point.items()).replace("/", "-")


def run_sweep(
    config: str | Path, grid_items: list[str], output: Path | None = None, overrides: list[str] | None = None, log=print
) -> list[dict]:
    from tunelab.eval.evaluate import evaluate_run
    from tunelab.train.recipe import run_training

    grid = parse_grid(grid_items)
    if not grid:
        raise ConfigError("sweep: give at least one --grid key.path=v1,v2")
    base = load_config(config, overrides or [])
    output = Path(output or f"{base.train.output_dir.rstrip('/')}-sweep")
    points = grid_points(grid)
    for point in points:  # validate every point before training any
        load_config(config, [*(overrides or []), *(f"{k}={v}" for k, v in point.items())])
    log(f"sweep: {len(points)} runs into {output}")
    results = []
    for i, point in enumerate(points, 1):
        name = point_name(point)
        run_dir = output / name
        settings = [*(overrides or []), *(f"{k}={v}" for k, v in point.items()), f"train.output_dir={run_dir}"]
        cfg = load_config(config, settings)
        log(f"[{i}/{len(points)}] {name}")
        started = time.perf_counter()
        summary = run_training(cfg, resume=True, log=log)
        report = evaluate_run(run_dir, samples=False)
        results.append(
            {
                "name": name,
                "run_dir": str(run_dir),
                **{key: value for key, value in point.items()},
                "val_loss_base": report["base"]["val_loss"],
                "val_loss_tuned": report["tuned"]["val_loss"],
                "improvement": report["base"]["val_loss"] - report["tuned"]["val_loss"],
                "train_tok_per_s": summary["tokens_per_second"],
                "train_seconds": summary["train_seconds"],
                "wall_seconds": round(time.perf_counter() - started, 2),
                "final_train_loss": summary["final_train_loss"],
            }
        )
        write_results(output, [k for k, _ in grid], results)
    best = min(results, key=lambda r: r["val_loss_tuned"])
    log(
        f"best by held-out loss: {best['name']} ({best['val_loss_tuned']:.4f}; base {best['val_loss_base']:.4f}); table: {output / 'sweep.md'}"
    )
    return results


def write_results(output: Path, keys: list[str], results: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    ranked = sorted(results, key=lambda r: r["val_loss_tuned"])
    (output / "sweep.json").write_text(
        json.dumps({"grid": keys, "ranked_by": "val_loss_tuned", "runs": ranked}, indent=2)
    )
    lines = [
        "# Sweep results (ranked by held-out loss of the tuned adapter, assistant tokens only)",
        "",
        "| rank | " + " | ".join(keys) + " | val loss base | val loss tuned | train tok/s | train s | run |",
        "|---|" + "---|" * len(keys) + "---|---|---|---|---|",
    ]
    for rank, r in enumerate(ranked, 1):
        cells = " | ".join(str(r[k]) for k in keys)
        lines.append(
            f"| {rank} | {cells} | {r['val_loss_base']:.4f} | {r['val_loss_tuned']:.4f} | {r['train_tok_per_s']:.0f} | "
            f"{r['train_seconds']:.0f} | {r['name']} |"
        )
    (output / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_results(output / "sweep.png", ranked)


def plot_results(path: Path, ranked: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in ranked]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["val_loss_base"] for r in ranked], width=0.4, label="base", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], [r["val_loss_tuned"] for r in ranked], width=0.4, label="tuned", color="#3b75af")
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out loss (assistant tokens)")
    low = min(min(r["val_loss_tuned"], r["val_loss_base"]) for r in ranked)
    high = max(max(r["val_loss_tuned"], r["val_loss_base"]) for r in ranked)
    ax.set_ylim(max(0.0, low - 0.1 * (high - low + 1e-3) - 0.05), high + 0.05)
    ax.legend()
    ax.set_title("sweep: held-out loss per grid point (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
