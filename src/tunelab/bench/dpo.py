"""`tunelab bench train --objective dpo --vs trl`: tunelab's DPO loop vs TRL's DPOTrainer + PEFT on the same pairs.

Pairs: the first exchange of the config's prepared conversations; `chosen` is the conversation's own answer and
`rejected` the answer of the next conversation (a real reply, to another question), so preferring the chosen one
is learnable and held-out preference accuracy means something. They go through `tunelab data prepare` as
preference data, then each side (tunelab.bench.worker, as for sft) trains on the same ids in the same order and is
scored by the same held-out evaluator. Reported: real tokens/s (chosen + rejected, no padding), s/step, peak RSS,
held-out DPO loss, preference accuracy and reward margin; medians over `repeats` alternating runs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from tunelab.bench.machine import run_header
from tunelab.bench.train import (
    SIDES,
    _fmt,
    ensure_trl,
    job_flops,
    matmul_peak_gflops,
    precision_blocks,
    run_repeats,
    summarise,
    worker_config,
)
from tunelab.bench.worker import ordered_rows

PREFERENCE_KEYS = ("val_pref_accuracy", "val_reward_margin", "reference_seconds")


def build_pairs(cfg, folder: Path, max_pairs: int) -> Path:
    """A preference JSONL from the config's conversations: own answer (chosen) vs the next one's (rejected)."""
    from tunelab.data.prepare import load_prepared, prepare_dataset

    train, _ = load_prepared(
        prepare_dataset(cfg.model_copy(update={"train": cfg.train.model_copy(update={"objective": "sft"})}))
    )
    exchanges = []
    for text in train["messages"]:
        messages = json.loads(text)
        start = 1 if messages[0]["role"] == "system" else 0
        exchanges.append((messages[: start + 1], messages[start + 1]["content"]))
        if len(exchanges) > max_pairs:
            break
    path = folder / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for (prompt, answer), (_, other) in zip(exchanges, exchanges[1:]):
            if answer.strip() != other.strip():
                f.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": other}, ensure_ascii=False) + "\n")
    return path


def bench_pairs(cfg, folder: Path, pairs_needed: int, max_val_rows: int) -> tuple[list, list]:
    from tunelab.config import DataConfig, SourceConfig
    from tunelab.data.prepare import load_prepared, prepare_dataset

    pairs_file = build_pairs(cfg, folder, pairs_needed)
    data = DataConfig(
        sources=[SourceConfig(path=str(pairs_file))], output_dir=str(folder / "prepared"), val_fraction=0.2
    )
    pref = cfg.model_copy(update={"data": data, "train": cfg.train.model_copy(update={"objective": "dpo"})})
    train, val = load_prepared(prepare_dataset(pref))

    def as_pairs(ds):
        return [
            [[c, cl], [r, rl]]
            for c, cl, r, rl in zip(
                ds["chosen_input_ids"], ds["chosen_labels"], ds["rejected_input_ids"], ds["rejected_labels"]
            )
        ]

    return as_pairs(train), as_pairs(val)[:max_val_rows]


def run_dpo_bench(
    cfg,
    steps: int = 10,
    repeats: int = 1,
    precisions: list[str] | None = None,
    threads: int = 2,
    vs: str | None = "trl",
    max_val_rows: int = 32,
    command: str | None = None,
    log=print,
) -> dict:
    from tunelab.models import resolve_model_path
    from tunelab.train.precision import precision_for_this_machine

    sides = ["tunelab"] + (["trl"] if vs == "trl" else [])
    if "trl" in sides:
        ensure_trl()
    precisions = precisions or ["fp32"] + (["bf16"] if precision_for_this_machine("auto", "cpu").name == "bf16" else [])
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    model_path = resolve_model_path(cfg.model.name)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-dpo-") as tmp:
        tmp = Path(tmp)
        train_rows, val_rows = bench_pairs(cfg, tmp, int(steps * per_step * 1.5) + 2 * max_val_rows, max_val_rows)
        trained = ordered_rows(train_rows, steps, per_step, cfg.train.seed)
        flops = job_flops(model_path, cfg.lora, [sequence for pair in trained for sequence in pair])
        log(f"bench train --objective dpo: {len(train_rows)} train / {len(val_rows)} val pairs, model {model_path}")
        log(
            f"  {steps} optimizer steps x {per_step} pairs, beta {cfg.train.beta}, {threads} threads, "
            f"{repeats} repeats, {precisions}"
        )
        data_file = tmp / "data.json"
        data_file.write_text(json.dumps({"train": train_rows, "val": val_rows}))
        for precision in precisions:
            job = worker_config(cfg, model_path, steps, precision, threads, objective="dpo", dpo_loss="sigmoid")
            peak = matmul_peak_gflops(precision, threads)
            runs = run_repeats(sides, job, data_file, tmp, repeats, log)
            for result in (r for side_runs in runs.values() for r in side_runs):
                log(
                    f"    {result['side']}: held-out preference accuracy {result['val_pref_accuracy']:.3f}, "
                    f"reward margin {result['val_reward_margin']:+.4f}"
                )
            block = summarise(runs, peak, flops)
            for side in sides:
                for key in PREFERENCE_KEYS:
                    block[side][key] = statistics.median(r[key] for r in runs[side])
            results[precision] = block
    doc = dict(results[precisions[0]])
    for precision in precisions[1:]:
        doc[precision] = results[precision]
    doc.update(
        objective="dpo",
        precision=precisions[0],
        precisions=precisions,
        steps=steps,
        repeats=repeats,
        pairs_per_step=per_step,
        max_seq_len=cfg.train.max_seq_len,
        beta=cfg.train.beta,
        lora=cfg.lora.model_dump(mode="json"),
        model=cfg.model.name,
        **run_header(command or "tunelab bench train --objective dpo --vs trl", threads),
    )
    return doc


def markdown_table(doc: dict) -> str:
    lines = [
        "| precision | side | real tok/s | tok/CPU-s (steps 2+) | s/step | peak RSS MiB "
        "| held-out DPO loss | preference accuracy | reward margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, block in precision_blocks(doc):
        for side in SIDES:
            if side in block:
                s = block[side]
                lines.append(
                    f"| {precision} | {side} | {s['tok_per_s']:.1f} | {_fmt(s.get('tok_per_cpu_s'))} "
                    f"| {s['s_per_step']:.2f} | {s['peak_rss_mib']:.0f} | "
                    f"{s['val_loss']:.4f} | {s['val_pref_accuracy']:.3f} | {s['val_reward_margin']:+.4f} |"
                )
        if "ratio" in block:
            r = block["ratio"]
            lines.append(
                f"| {precision} | **tunelab/TRL** | **{r['tok_per_s']:.2f}x** | {_fmt(r.get('tok_per_cpu_s'), 'x')} "
                f"| {r['s_per_step']:.2f}x | "
                f"**{r['peak_rss_mib']:.2f}x** | {r['val_loss_delta']:+.4f} | | |"
            )
    lines += [
        "",
        f"Command: `{doc['command']}`; machine: {doc['machine']}; date: {doc['date']}; {doc['steps']} optimizer "
        f"steps x {doc['pairs_per_step']} pairs, beta {doc['beta']}, median of {doc['repeats']} run(s) per side.",
    ]
    return "\n".join(lines) + "\n"
