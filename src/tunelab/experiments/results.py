"""A sweep's results as files: results.csv, results.md and PNG plots, rebuilt from the run folders alone.

`tunelab report SWEEP_DIR` calls write_report on whatever runs have finished. The best run is chosen by
held-out metrics (travel rubric score of the tuned model, then general held-out loss); the run with the
lowest training loss is shown beside it when it is a different run, because training loss rewards
memorisation and is not what a user of the app sees.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

COLUMNS = [
    "name",
    "model",
    "train_loss_last10",
    "final_train_loss",
    "general_val_loss_base",
    "general_val_loss_tuned",
    "travel_val_loss_base",
    "travel_val_loss_tuned",
    "own_val_loss_final",
    "own_val_loss_best",
    "travel_score_base",
    "travel_score_tuned",
    "travel_wins",
    "travel_ties",
    "travel_losses",
    "travel_win_rate",
    "travel_win_rate_low",
    "travel_win_rate_high",
    "travel_score_difference_low",
    "travel_score_difference_high",
    "travel_sign_test_p",
    "travel_verdict",
    "travel_days_honoured_tuned",
    "travel_source",
    "train_seconds",
    "train_tok_per_s",
    "peak_rss_mib",
    "trainable_params",
    "adapter_mib",
    "gguf_mib",
    "cpu_ttft_s",
    "cpu_decode_tok_s",
]


def swept_keys(results: list[dict]) -> list[str]:
    """Override keys whose value differs between runs (the x axes of the plots)."""
    keys: list[str] = []
    for r in results:
        keys += [k for k in r["overrides"] if k not in keys]
    return [k for k in keys if len({repr(r["overrides"].get(k)) for r in results}) > 1]


def best_run(results: list[dict]) -> dict | None:
    """Best by held-out metrics: highest tuned travel score, then lowest general held-out loss."""
    if not results:
        return None
    return min(
        results, key=lambda r: (-(r.get("travel_score_tuned") or 0.0), r.get("general_val_loss_tuned") or float("inf"))
    )


TAIL_STEPS = 10


def train_loss_tail(result: dict) -> float | None:
    """Mean training loss of the run's last 10 logged steps. One step's loss swings with its batch (1.42-2.10
    over the last three steps of a quickstart run), so the last step alone cannot rank runs."""
    losses = [loss for _, loss in result.get("curves", {}).get("train", [])][-TAIL_STEPS:]
    return sum(losses) / len(losses) if losses else result.get("final_train_loss")


def training_loss_winner(results: list[dict]) -> dict | None:
    with_loss = [r for r in results if train_loss_tail(r) is not None]
    return min(with_loss, key=train_loss_tail) if with_loss else None


def with_derived(result: dict) -> dict:
    """A result with the columns computed from it: the last-10-steps train loss and the interval bounds."""
    row = {**result, "train_loss_last10": train_loss_tail(result)}
    for key, interval in (
        ("travel_win_rate", result.get("travel_win_rate_interval")),
        ("travel_score_difference", result.get("travel_score_difference_interval")),
    ):
        row[f"{key}_low"], row[f"{key}_high"] = interval or (None, None)
    return row


def write_report(output: Path, results: list[dict]) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    keys = swept_keys(results)
    written = [output / "results.csv", output / "results.md"]
    written[0].write_text(results_csv(results, keys))
    written[1].write_text(results_markdown(results, keys))
    if results:
        written += write_plots(output, [with_derived(r) for r in results], keys)
    return written


def results_csv(results: list[dict], keys: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*keys, *COLUMNS])
    for r in results:
        row = with_derived(r)
        writer.writerow([*(r["overrides"].get(k) for k in keys), *(row.get(c) for c in COLUMNS)])
    return buffer.getvalue()


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return " + ".join(v["name"] for v in value)  # data.sources: the source names, not every field
    if isinstance(value, float):
        if value and abs(value) < 10**-digits:  # learning rates such as 5e-06
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


def results_markdown(results: list[dict], keys: list[str]) -> str:
    best, by_train = best_run(results), training_loss_winner(results)
    lines = ["# Sweep results", ""]
    if best:
        lines.append(f"Best by held-out metrics (travel rubric, then general held-out loss): **{best['name']}**.")
        if by_train and by_train["name"] != best["name"]:
            lines.append(
                f"Lowest training loss (mean of the last {TAIL_STEPS} steps): {by_train['name']} "
                f"({_fmt(train_loss_tail(by_train))}) — not the same run."
            )
        lines.append("")
    header = [
        "run",
        *keys,
        f"train loss (last {TAIL_STEPS} steps)",
        "general val base → tuned",
        "travel val base → tuned",
        "travel score base → tuned",
        "win/tie/loss",
        "win rate [95 % CI]",
        "sign test p: verdict",
        "days ok",
        "train s",
        "tok/s",
        "peak MiB",
        "LoRA params",
        "adapter MiB",
        "TTFT s",
        "decode tok/s",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        mark = " ★" if best and r["name"] == best["name"] else ""
        mark += " (lowest train loss)" if by_train and r["name"] == by_train["name"] and by_train is not best else ""
        wtl = "—" if r.get("travel_wins") is None else f"{r['travel_wins']}/{r['travel_ties']}/{r['travel_losses']}"
        cells = [
            f"{r['name']}{mark}",
            *(_fmt(r["overrides"].get(k)) for k in keys),
            _fmt(train_loss_tail(r)),
            f"{_fmt(r.get('general_val_loss_base'))} → {_fmt(r.get('general_val_loss_tuned'))}",
            f"{_fmt(r.get('travel_val_loss_base'))} → {_fmt(r.get('travel_val_loss_tuned'))}",
            f"{_fmt(r.get('travel_score_base'), 3)} → {_fmt(r.get('travel_score_tuned'), 3)}",
            wtl,
            _rate_with_interval(r),
            "—" if r.get("travel_sign_test_p") is None else f"{r['travel_sign_test_p']:.3f}: {r['travel_verdict']}",
            _fmt(r.get("travel_days_honoured_tuned"), 2),
            _fmt(r.get("train_seconds"), 0),
            _fmt(r.get("train_tok_per_s"), 0),
            _fmt(r.get("peak_rss_mib"), 0),
            _fmt(r.get("trainable_params")),
            _fmt(r.get("adapter_mib"), 1),
            _fmt(r.get("cpu_ttft_s"), 3),
            _fmt(r.get("cpu_decode_tok_s"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Plots: loss_curves.png, metrics_vs_<key>.png, quality_vs_latency.png (when latency was measured).",
        "",
    ]
    return "\n".join(lines)


def _rate_with_interval(result: dict) -> str:
    rate, interval = result.get("travel_win_rate"), result.get("travel_win_rate_interval")
    if rate is None:
        return "—"
    return f"{rate:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _error_bar(result: dict, metric: str) -> tuple[float, float] | None:
    """(below, above) the plotted value from its 95 % interval: the win rate's own, or for the tuned rubric score
    the base score plus the interval of the paired score difference (the base is the same for every run)."""
    value = result.get(metric)
    if metric == "travel_win_rate":
        low, high = result.get("travel_win_rate_low"), result.get("travel_win_rate_high")
    elif metric == "travel_score_tuned" and result.get("travel_score_base") is not None:
        low, high = (
            None if result.get(f"travel_score_difference_{side}") is None
            else result["travel_score_base"] + result[f"travel_score_difference_{side}"]
            for side in ("low", "high")
        )  # fmt: skip
    else:
        return None
    if value is None or low is None or high is None:
        return None
    return max(0.0, value - low), max(0.0, high - value)


def write_plots(output: Path, results: list[dict], keys: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [output / "loss_curves.png"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        train, val = r["curves"]["train"], r["curves"]["val"]
        line = ax.plot([s for s, _ in train], [v for _, v in train], alpha=0.7, label=f"{r['name']} train")[0]
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o--", color=line.get_color(), label=f"{r['name']} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("train (lines) and own val (dashed) loss per run")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    metrics = [
        ("general_val_loss_tuned", "general held-out loss"),
        ("travel_val_loss_tuned", "travel held-out loss"),
        ("train_loss_last10", f"train loss (last {TAIL_STEPS} steps)"),
        ("travel_score_tuned", "travel rubric score (95 % CI)"),
        ("travel_win_rate", "travel win rate, non-tied (95 % CI)"),
    ]
    for i, key in enumerate(keys):
        if any(_tied(results, earlier, key) for earlier in keys[:i]):
            continue  # alpha = 2 x rank: the rank's plot already shows it
        path = output / f"metrics_vs_{key.replace('.', '_')}.png"
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
        positions, tick_labels, log_x = _x_axis([r["overrides"].get(key) for r in results])
        series = _series_by_other_keys(results, [k for k in keys if k != key and not _tied(results, key, k)])
        for ax, (metric, title) in zip(axes, metrics):
            for label, runs in series.items():
                points = sorted(
                    ((positions[repr(r["overrides"].get(key))], r.get(metric), _error_bar(r, metric))
                     for r in runs if r.get(metric) is not None),
                    key=lambda point: point[:2],
                )  # fmt: skip
                bars = [e for _, _, e in points]
                errors = None if any(e is None for e in bars) else [[e[0] for e in bars], [e[1] for e in bars]]
                ax.errorbar([x for x, _, _ in points], [y for _, y, _ in points], yerr=errors, fmt="o-", capsize=3,
                            label=label or None)  # fmt: skip
            # Where the untrained model stands (a win rate of 0.5): a run below it got worse. One line when every
            # run shares its base; a mark at each run when the sweep changes the base model itself.
            bases = [(0.5, None)] if metric == "travel_win_rate" else _base_marks(results, metric, key, positions)
            if len(bases) == 1:
                ax.axhline(bases[0][0], color="grey", linestyle="--", linewidth=1, label="base")
            elif bases:
                ax.scatter([x for _, x in bases], [y for y, _ in bases], marker="_", s=300, color="grey",
                           label="each run's base")  # fmt: skip
            if log_x:
                ax.set_xscale("log")
            if tick_labels:
                ax.set_xticks(range(len(tick_labels)), tick_labels, rotation=30, fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(key, fontsize=8)
        handles, labels = axes[0].get_legend_handles_labels()
        if len(labels) > 1:
            fig.legend(handles, labels, fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.85 if len(labels) > 1 else 1, 1))
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    timed = [r for r in results if r.get("cpu_decode_tok_s") and r.get("travel_score_tuned") is not None]
    if timed:
        path = output / "quality_vs_latency.png"
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in timed:
            ax.scatter(r["cpu_decode_tok_s"], r["travel_score_tuned"])
            ax.annotate(r["name"], (r["cpu_decode_tok_s"], r["travel_score_tuned"]), fontsize=7)
        quants = sorted({r.get("latency_quant", "q4_k_m") for r in timed})
        ax.set_xlabel(f"CPU decode tokens/s, {', '.join(quants)} (higher is faster)")
        ax.set_ylabel("travel rubric score (tuned)")
        ax.set_title("travel quality vs CPU speed")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _x_axis(values: list) -> tuple[dict[str, float], list[str], bool]:
    """Numeric swept values sit at their value (log scale when they span a decade or more, as learning rates do);
    anything else (booleans, strings, source lists) at evenly spaced ticks in first-seen order."""
    distinct = list(dict.fromkeys(repr(v) for v in values))
    by_repr = {repr(v): v for v in values}
    if all(isinstance(by_repr[k], (int, float)) and not isinstance(by_repr[k], bool) for k in distinct):
        numbers = [float(by_repr[k]) for k in distinct]
        log_x = min(numbers) > 0 and max(numbers) / min(numbers) >= 10
        return {k: float(by_repr[k]) for k in distinct}, [], log_x
    labels = ["(base config)" if by_repr[k] is None else _fmt(by_repr[k]) for k in distinct]  # a run that keeps it
    return {k: float(i) for i, k in enumerate(distinct)}, labels, False


def _series_by_other_keys(results: list[dict], other_keys: list[str]) -> dict[str, list[dict]]:
    """One line per combination of the other swept keys, so a grid's lines do not zig-zag between settings."""
    series: dict[str, list[dict]] = {}
    for r in results:
        label = ", ".join(f"{k}={_fmt(r['overrides'].get(k))}" for k in other_keys)
        series.setdefault(label, []).append(r)
    return series


def _tied(results: list[dict], key: str, other: str) -> bool:
    """Whether two swept keys move together (lora.r and lora.alpha = 2 x rank): then `other` is not a separate
    series."""
    pairs = {(repr(r["overrides"].get(key)), repr(r["overrides"].get(other))) for r in results}
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def _base_marks(results: list[dict], metric: str, key: str, positions: dict[str, float]) -> list[tuple]:
    """The base model's values of a tuned metric as (value, x) marks: one (value, None) when every run shares it
    (the held-out sets and prompts are fixed by the sweep, so runs of one base model do), else one per run at its x
    (a sweep over model.name: each run has a base of its own); [] for a metric without a base."""
    if not metric.endswith("_tuned"):
        return []
    base_key = metric.removesuffix("_tuned") + "_base"
    marks = [(r[base_key], positions[repr(r["overrides"].get(key))]) for r in results if r.get(base_key) is not None]
    if len({value for value, _ in marks}) == 1:
        return [(marks[0][0], None)]
    return marks


def rebuild_report(sweep_dir: Path) -> list[Path]:
    """`tunelab report SWEEP_DIR`: the tables and plots again, from the runs' sweep-result.json files."""
    from tunelab.errors import UserError
    from tunelab.experiments.study import results_from_runs

    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: not a folder")
    results = results_from_runs(sweep_dir)
    if not results:
        raise UserError(f"{sweep_dir}: no finished sweep runs (no */sweep-result.json)")
    return write_report(sweep_dir, results)
