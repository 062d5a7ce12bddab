"""One side of `tunelab bench train` (sft or dpo), run in its own process so that its peak RSS is its own.

    python -m tunelab.bench.worker --side tunelab|tunelab_lean|trl|trl_lean --spec SPEC.json --out RESULT.json

SPEC.json (written by tunelab.bench.train) holds `config`, the job's whole tunelab Config (`Config.model_dump`:
model folder, LoRA, objective, steps, batch, optimizer settings, precision, threads, seed; see
`bench.train.worker_config`), and `data_file`, the prepared rows of both splits (`train`, `val`): sft rows are
`[input_ids, labels]`, dpo rows `[[chosen ids, labels], [rejected ids, labels]]`. Every side trains on the same rows
in tunelab's own order (`batching.step_indices`, see `ordered_rows`), except TRL's fastest sft configuration,
which takes the same rows in its length-grouped order.

Sides: tunelab in its default loop (`tunelab`) and recomputing activations while handing freed memory back to the
OS every step (`tunelab_lean`); TRL (SFTTrainer or DPOTrainer + PEFT, the same LoraConfig as tunelab's recipe) in
its fastest configuration (`trl`) and its memory-lean default (`trl_lean`), see `TRL_CONFIGS`. DPOTrainer is given
tunelab's token ids directly (its tokenising step is bypassed), and both DPO sides compute their reference
log-probs once before training, outside the timed part. Model loading and data preparation are outside the timed
part; the timed part is the sum of the optimizer steps. After training every adapter is scored by tunelab's own
held-out evaluator on the same rows (sft: `heldout_loss` on assistant tokens; dpo: the preference objective's
loss, accuracy and reward margin with the adapter disabled as the reference). Peak RSS is the worker process's own
high-water mark (`train.memory.peak_rss_mib`); tunelab sides also split it into the model's loading and the training
(`PhasePeaks`) and record how the base was quantised (`quantization`, `quantized_layer_types`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tunelab.config import Config, EvalConfig
from tunelab.train.memory import peak_rss_mib, process_status_mib

# tunelab's two configurations, mirroring TRL's: its fastest (the default loop) and its memory-lean one (the same
# loop recomputing each decoder layer in the backward pass and handing freed memory back to the OS every step).
TUNELAB_CONFIGS = {
    "tunelab": {"gradient_checkpointing": False, "release_memory": False},
    "tunelab_lean": {"gradient_checkpointing": True, "release_memory": True},
}
# TRL's two configurations: the fastest one it documents for this job, and its memory-lean default.
TRL_CONFIGS = {
    # Gradient checkpointing off (no recomputation) and HF's length-grouped sampler (batches of similar lengths,
    # so little padding): the speed a user who tunes TRL for speed gets. Same conversations, another order.
    # DPO pairs have no single length column to group by: DPOTrainer keeps tunelab's order (see trl_settings).
    "trl": {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
    # TRL's default (gradient checkpointing on), in tunelab's order: the leanest TRL, and the same-order run.
    "trl_lean": {"gradient_checkpointing": True, "train_sampling_strategy": "sequential"},
}
SIDES = (*TUNELAB_CONFIGS, *TRL_CONFIGS)
# The lean sides hand freed memory back to the OS after every step (tunelab: `train.release_memory`); TRL gets the
# same call from a callback, so the memory ratio compares the tools, not allocator settings.
RELEASES_MEMORY = {"tunelab_lean", "trl_lean"}
EVAL_BATCH = 8  # held-out rows per padded batch when scoring, the same for every side


class PhasePeaks:
    """Peak RSS per phase of a tunelab worker: building the model (loading the base, LoRA), then the rest up to
    the end of training (dpo: the reference pass included).

    When loading ends, the kernel's high-water mark of this process (VmHWM) is set back to its current RSS
    (`/proc/self/clear_refs`, Linux), so the training's own peak can be read too. The process's peak over both
    phases is then the larger of the two: `process_peak`."""

    def __init__(self) -> None:
        self.earlier_peak = 0.0
        self.figures: dict[str, float | None] = {}

    def loaded(self) -> None:
        self.earlier_peak = max(self.earlier_peak, peak_rss_mib())
        self.figures["load_peak_rss_mib"] = self.earlier_peak
        self.figures["rss_after_load_mib"] = process_status_mib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.figures["training_phase_peak_rss_mib"] = None  # read at the end of training
        except OSError:  # not Linux: the peak after loading stays the process's
            pass

    def trained(self) -> None:
        if "training_phase_peak_rss_mib" in self.figures:
            self.figures["training_phase_peak_rss_mib"] = process_status_mib("VmHWM")

    def process_peak(self) -> float:
        return max(self.earlier_peak, peak_rss_mib())


PEAKS = PhasePeaks()


def ordered_rows(train_rows: list, steps: int, per_step: int, seed: int) -> list:
    """The rows tunelab's loop trains on, in its order (step by step)."""
    from tunelab.train.batching import step_indices

    return [train_rows[i] for step in range(steps) for i in step_indices(step, per_step, len(train_rows), seed)]


def load_rows(data_file: Path, objective: str) -> tuple[list, list]:
    """(train, val) rows as the loop takes them: (ids, labels) tuples, or PairRows for dpo."""
    from tunelab.train.objectives import PairRow

    data = json.loads(data_file.read_text())
    if objective == "dpo":
        convert = lambda row: PairRow(tuple(row[0]), tuple(row[1]))  # noqa: E731
    else:
        convert = tuple
    return [convert(r) for r in data["train"]], [convert(r) for r in data["val"]]


class StepTimer:
    """Wall clock, process CPU seconds and tokens so far, marked after every optimizer step."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.tokens: list[int] = []

    def start(self) -> None:
        self.wall = [time.perf_counter()]

    def mark(self, tokens: int) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.tokens.append(tokens)

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.wall, self.wall[1:])]

    def after_first_step(self) -> dict:
        """Load-robust figure: process CPU seconds and tokens of steps 2..N."""
        if len(self.cpu) < 2:
            return {"cpu_seconds_after_first": None, "tokens_after_first": None, "tok_per_cpu_s": None}
        cpu, tokens = self.cpu[-1] - self.cpu[0], self.tokens[-1] - self.tokens[0]
        return {"cpu_seconds_after_first": cpu, "tokens_after_first": tokens, "tok_per_cpu_s": tokens / max(cpu, 1e-9)}


class TokenCounter:
    """A forward pre-hook: real (non-padding) tokens and computed positions of everything the model is fed."""

    def __init__(self) -> None:
        self.tokens = 0
        self.positions = 0

    def __call__(self, module, args, kwargs) -> None:
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        self.tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        self.positions += int(ids.numel()) if ids is not None else int(mask.numel())


def checkpointing_active(model) -> bool:
    """Whether the trained model really recomputes activations (HF decoders set `gradient_checkpointing` on)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def score(model, val_rows: list, cfg: Config, pad_id: int) -> dict:
    """tunelab's held-out figures in padded batches, in the precision the side trained in."""
    from tunelab.train.precision import Precision

    precision, device = Precision(cfg.train.precision, "bench"), torch.device("cpu")
    if cfg.train.objective == "sft":
        from tunelab.train.heldout import heldout_loss

        return {"val_loss": heldout_loss(model, val_rows, EVAL_BATCH, False, pad_id, precision, device)}
    from tunelab.train.objectives import PreferenceObjective
    from tunelab.train.reference import reference_logps, store

    train_cfg = cfg.train.model_copy(update={"packing": False})
    values = reference_logps(model, val_rows, EVAL_BATCH, False, pad_id, precision, device, train_cfg.loss_chunk_tokens)
    for row, row_values in zip(val_rows, values.tolist()):
        store(row, row_values)
    objective = PreferenceObjective([], val_rows, train_cfg, EvalConfig(batch_size=EVAL_BATCH), pad_id, precision)
    figures = objective.evaluate(model, device)
    return {key: figures[key] for key in ("val_loss", "val_pref_accuracy", "val_reward_margin")}


# ------------------------------------------------------------------------------------ tunelab
def run_tunelab(cfg: Config, train_rows: list, val_rows: list, workdir: Path, side: str) -> dict:
    from accelerate import Accelerator

    from tunelab.models import load_tokenizer
    from tunelab.models.quantization import describe_quantization, quantized_layers
    from tunelab.train.loop import train_lora
    from tunelab.train.precision import Precision
    from tunelab.train.recipe import build_lora_model, layer_surgery

    run_dir = workdir / "run"
    train_cfg = cfg.train.model_copy(update={"output_dir": str(run_dir), **TUNELAB_CONFIGS[side]})
    cfg = cfg.model_copy(update={"train": train_cfg})
    precision = Precision(train_cfg.precision, "bench")
    tokenizer = load_tokenizer(cfg.model)
    model = build_lora_model(cfg, precision)
    PEAKS.loaded()
    extra = {}
    if train_cfg.objective == "dpo":
        from tunelab.train.reference import reference_logps, store

        started = time.perf_counter()
        values = reference_logps(model, train_rows, 16, train_cfg.packing, tokenizer.pad_token_id, precision,
                                 torch.device("cpu"), train_cfg.loss_chunk_tokens)  # fmt: skip
        for row, row_values in zip(train_rows, values.tolist()):
            store(row, row_values)
        extra["reference_seconds"] = time.perf_counter() - started
    layer_surgery(model, train_cfg)  # as the recipe does: fused or compiled layers, after the reference pass
    timer = StepTimer()
    result = train_lora(
        model,
        train_rows,
        val_rows[:1],
        train_cfg,
        cfg.eval,
        run_dir,
        precision,
        tokenizer.pad_token_id,
        Accelerator(cpu=True),
        resume=False,
        log=lambda *_: None,
        progress=lambda step, record: timer.mark(record["tokens"]),  # after every step (logging_steps = 1)
    )
    PEAKS.trained()
    training_peak = PEAKS.process_peak()  # before the held-out scoring below (see main)
    return {
        **timer.after_first_step(),
        **extra,
        **PEAKS.figures,
        "quantization": describe_quantization(model),  # None for an unquantised base
        "quantized_layer_types": sorted({type(m).__name__ for m in quantized_layers(model)}),
        "tokens": result.tokens,
        "train_seconds": result.train_seconds,
        "step_seconds": [h["step_s"] for h in result.history if "step_s" in h],  # the loop's own step times
        "final_train_loss": result.final_train_loss,
        "loop_mfu": result.mfu,  # what the training loop itself logs (its own FLOP count and cached peak)
        "positions_computed": result.tokens if train_cfg.packing else None,  # packed rows: no padding
        "gradient_checkpointing_active": checkpointing_active(model),
        "tunelab_settings": TUNELAB_CONFIGS[side],
        "training_peak_rss_mib": training_peak,
        **score(model, val_rows, cfg, tokenizer.pad_token_id),
    }


# ---------------------------------------------------------------------------------------- TRL
def trl_settings(cfg: Config, output_dir: str, side: str) -> dict:
    """SFTConfig/DPOConfig arguments: TRL's defaults, plus what makes the job the same as tunelab's (see
    docs/benchmarks.md), plus the configuration's speed/memory choices (`TRL_CONFIGS`)."""
    train = cfg.train
    bf16 = train.precision == "bf16"
    common = {
        "output_dir": output_dir,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size * train.grad_accum,
        "gradient_accumulation_steps": 1,
        "learning_rate": train.lr,
        "lr_scheduler_type": {"constant": "constant_with_warmup"}.get(train.scheduler, train.scheduler),
        "warmup_steps": train.warmup_steps,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm or 0.0,  # 0: no clipping, as tunelab's None
        "optim": "adamw_torch",
        "max_length": train.max_seq_len,
        "bf16": bf16,  # SFTConfig defaults to bf16=True; the fp32 comparison turns it off
        "model_init_kwargs": {"dtype": "bfloat16" if bf16 else "float32"},
        "use_cpu": True,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 10,
        "dataloader_num_workers": 0,
        "seed": train.seed,
        **TRL_CONFIGS[side],
    }
    if train.objective == "dpo":
        return {
            **common,
            "beta": train.beta,
            "loss_type": [train.dpo_loss],
            "precompute_ref_log_probs": True,
            "train_sampling_strategy": "sequential",
        }
    # TRL's packing on CPU has no per-conversation attention (padding-free needs flash-attn)
    return {**common, "packing": False, "shuffle_dataset": False}


def reported_settings(settings: dict) -> dict:
    """The settings as the JSON reports them: the trainer's arguments plus `group_by_length` spelled out."""
    out = {k: v for k, v in settings.items() if k != "output_dir"}
    out["group_by_length"] = settings["train_sampling_strategy"] == "group_by_length"
    return out


def sft_trainer(rows: list, settings: dict):
    """SFTTrainer and its dataset: pre-tokenised, TRL turns `assistant_masks` into labels (assistant-only loss)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tunelab.data.masking import IGNORE_INDEX

    dataset = Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in rows],
            "assistant_masks": [[int(x != IGNORE_INDEX) for x in labels] for _, labels in rows],
        }
    )
    return SFTTrainer, SFTConfig(**settings), dataset


def dpo_trainer(rows: list, settings: dict):
    """DPOTrainer on tunelab's token ids: the prompt is each sequence's unlabelled head, the completion the rest."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tunelab.data.masking import IGNORE_INDEX

    def split(sequence):
        ids, labels = sequence
        n = sum(1 for x in labels if x == IGNORE_INDEX)
        return ids[:n], ids[n:]

    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for row in rows:
        (prompt, chosen), (_, rejected) = split(row.chosen), split(row.rejected)
        columns["prompt_ids"].append(prompt)
        columns["chosen_ids"].append(chosen)
        columns["rejected_ids"].append(rejected)

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenised by tunelab: the same ids on both sides

    return PreTokenized, DPOConfig(**settings), Dataset.from_dict(columns)


def run_trl(cfg: Config, train_rows: list, val_rows: list, workdir: Path, side: str) -> dict:
    from transformers import TrainerCallback

    from tunelab.models import load_tokenizer
    from tunelab.train.memory import release_free_heap
    from tunelab.train.recipe import peft_lora_config

    train = cfg.train
    rows = ordered_rows(train_rows, train.max_steps, train.batch_size * train.grad_accum, train.seed)
    settings = trl_settings(cfg, str(workdir / "trl"), side)
    trainer_class, args, dataset = (dpo_trainer if train.objective == "dpo" else sft_trainer)(rows, settings)
    tokenizer = load_tokenizer(cfg.model)
    counter, timer = TokenCounter(), StepTimer()

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timer.start()

        def on_step_end(self, args, state, control, **kwargs):
            if side in RELEASES_MEMORY:
                release_free_heap()  # inside the timed step, as in tunelab's loop
            timer.mark(counter.tokens)

    started = time.perf_counter()
    trainer = trainer_class(
        model=cfg.model.name,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(cfg),
        callbacks=[Marks()],
    )
    setup_seconds = time.perf_counter() - started  # dpo: the reference pass dominates (model loading included)
    model = trainer.model
    handle = model.register_forward_pre_hook(counter, with_kwargs=True)
    trainer.train()
    handle.remove()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    training_peak = peak_rss_mib()  # before the held-out scoring below (see main)
    return {
        **timer.after_first_step(),
        **({"reference_seconds": setup_seconds} if train.objective == "dpo" else {}),
        "tokens": counter.tokens,
        "train_seconds": sum(timer.step_seconds()),
        "step_seconds": timer.step_seconds(),
        "final_train_loss": losses[-1] if losses else None,
        "trl_settings": reported_settings(settings),
        "positions_computed": counter.positions,
        "gradient_checkpointing_active": checkpointing_active(model),
        "training_peak_rss_mib": training_peak,
        **score(model, val_rows, cfg, tokenizer.pad_token_id),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    cfg = Config.model_validate(spec["config"])
    from tunelab.train.recipe import set_threads

    threads = set_threads(cfg.train.threads)
    train_rows, val_rows = load_rows(Path(spec["data_file"]), cfg.train.objective)
    run = run_tunelab if args.side in TUNELAB_CONFIGS else run_trl
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.side}-") as tmp:
        result = run(cfg, train_rows, val_rows, Path(tmp), args.side)
    result.update(
        side=args.side,
        objective=cfg.train.objective,
        precision=cfg.train.precision,
        threads=threads,
        steps=cfg.train.max_steps,
        tok_per_s=result["tokens"] / max(result["train_seconds"], 1e-9),
        s_per_step=statistics.median(result["step_seconds"]) if result["step_seconds"] else None,
        # The side's memory is its peak up to the end of training (model load included). The held-out scoring
        # afterwards is the same code on every side and its logits chunks (~400 MiB) would hide the training's
        # peak and pull every ratio towards 1; the whole process's peak is kept beside it.
        peak_rss_mib=result.pop("training_peak_rss_mib"),
        process_peak_rss_mib=PEAKS.process_peak(),
        pid=os.getpid(),
        allocator_env={k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "ONEDNN_"))},
    )
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
