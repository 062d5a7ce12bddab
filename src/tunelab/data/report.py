"""report.json, summary.md, token_lengths.png and the console table of a prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.problems import FILTER_REASONS, PROBLEM_REASONS, REPAIRS


def length_stats(lengths: list[int], label_lengths: list[int]) -> dict[str, float | int]:
    if not lengths:
        return {"rows": 0}
    arr = np.asarray(lengths)
    return {
        "rows": int(arr.size),
        "total": int(arr.sum()),
        "label_tokens": int(sum(label_lengths)),
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 1),
        "p50": int(np.percentile(arr, 50)),
        "p95": int(np.percentile(arr, 95)),
        "max": int(arr.max()),
    }


def write_report(folder: Path, report: dict[str, Any], lengths: dict[str, list[int]]) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "summary.md").write_text(summary_markdown(report), encoding="utf-8")
    plot_token_lengths(folder / "token_lengths.png", lengths, report["truncation"]["max_seq_len"])


def plot_token_lengths(path: Path, lengths: dict[str, list[int]], max_seq_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, max_seq_len, 41)
    for split, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{split} ({len(values)} rows)")
    ax.axvline(max_seq_len, color="black", linestyle="--", linewidth=1, label=f"max_seq_len {max_seq_len}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths of the prepared rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _describe(reason: str) -> str:
    return PROBLEM_REASONS.get(reason) or FILTER_REASONS.get(reason) or REPAIRS.get(reason) or reason


def summary_markdown(report: dict[str, Any]) -> str:
    splits = report["splits"]
    lines = [
        "# Prepared dataset",
        "",
        f"- train rows: **{splits['train']}**, val rows: **{splits['val']}** "
        f"(val_fraction {splits['val_fraction']}, by content hash)",
        f"- duplicates removed: {report['duplicates']['exact']['count']} exact, "
        f"{report['duplicates']['near']['count']} near",
        f"- unparsed bytes (truncated/malformed file tails): {report['unparsed_bytes']:,}",
        f"- truncation: `{report['truncation']['policy']}` at {report['truncation']['max_seq_len']} tokens - "
        f"{report['truncation']['description']} ({report['truncation']['truncated_rows']} rows truncated)",
        "",
        "## Sources",
        "",
        "| source | records read | valid | after dedup | train | val | unparsed bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["sources"]:
        lines.append(
            f"| {s['name']} | {s['records_read']} | {s['valid']} | {s['unique']} | {s['train_rows']} "
            f"| {s['val_rows']} | {s['unparsed_bytes']:,} |"
        )
    lines += ["", "## Dropped records", ""]
    if report["dropped"]:
        lines += ["| reason | count | meaning | first locations |", "|---|---:|---|---|"]
        for reason, info in report["dropped"].items():
            lines.append(f"| {reason} | {info['count']} | {_describe(reason)} | {', '.join(info['first'])} |")
    else:
        lines.append("None.")
    if report["repaired"]:
        lines += ["", "## Repairs (rows kept)", "", "| repair | count | first locations |", "|---|---:|---|"]
        for reason, info in report["repaired"].items():
            lines.append(f"| {reason} | {info['count']} | {', '.join(info['first'])} |")
    lines += [
        "",
        "## Token lengths",
        "",
        "| split | rows | total | min | mean | p50 | p95 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for split, st in report["tokens"].items():
        if st.get("rows"):
            lines.append(
                f"| {split} | {st['rows']} | {st['total']} | {st['min']} | {st['mean']} | {st['p50']} "
                f"| {st['p95']} | {st['max']} |"
            )
    lines += ["", "![token lengths](token_lengths.png)", ""]
    return "\n".join(lines)


def print_summary(report: dict[str, Any], folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Prepared data: {folder}", show_lines=False)
    for col in ("source", "read", "valid", "after dedup", "train", "val"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for s in report["sources"]:
        table.add_row(s["name"], *(str(s[k]) for k in ("records_read", "valid", "unique", "train_rows", "val_rows")))
    console = Console()
    console.print(table)
    dropped = ", ".join(f"{r} {info['count']}" for r, info in report["dropped"].items()) or "none"
    dups = report["duplicates"]
    tokens = report["tokens"]["train"]
    console.print(
        f"dropped: {dropped}\nduplicates: {dups['exact']['count']} exact, {dups['near']['count']} near; "
        f"unparsed bytes: {report['unparsed_bytes']:,}\n"
        f"train tokens: {tokens.get('total', 0):,} (mean {tokens.get('mean', 0)}, max {tokens.get('max', 0)}); "
        f"truncation: {report['truncation']['policy']} at {report['truncation']['max_seq_len']}"
    )
