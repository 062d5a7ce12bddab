"""One side of `tunelab bench train --vs trl`, run in its own process so its peak RSS is its own.

    python -m tunelab.bench.train_worker --side tunelab|tunelab_lean|trl|trl_lean --spec SPEC.json --out RESULT.json

SPEC.json (written by tunelab.bench.train) holds the model folder, the settings shared by both
sides and the path of a data file with the prepared conversations (`train`: all training rows, `val`: the
held-out rows, each `[input_ids, labels]`). Every side trains on the same conversations: the ones tunelab's own
order (`batching.step_indices`) gives for the run's steps. TRL runs in two configurations (see `TRL_CONFIGS`):
`trl` (its fastest for this job: no gradient checkpointing, length-grouped batches, so the same conversations in
another order) and `trl_lean` (TRL's memory-lean default: gradient checkpointing on, tunelab's order, sequential
sampling: the same-order run for the held-out loss check); tunelab likewise (`TUNELAB_CONFIGS`). Model loading and dataset preparation are outside the timed part; the timed part is the sum of the
optimizer steps. After training, each adapter is scored by tunelab's own evaluator
(`tunelab.train.heldout.heldout_loss`, assistant tokens only) on the same held-out rows.
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

from tunelab.train.memory import peak_rss_mib


def ordered_rows(train_rows: list, steps: int, per_step: int, seed: int) -> list:
    """The conversations tunelab's loop trains on, in its order (step by step)."""
    from tunelab.train.batching import step_indices

    return [train_rows[i] for step in range(steps) for i in step_indices(step, per_step, len(train_rows), seed)]


def score(model, val_rows: list, precision_name: str, pad_id: int) -> float:
    """tunelab's held-out loss (assistant tokens), padded batches, in the precision the side trained in."""
    from tunelab.train.heldout import heldout_loss
    from tunelab.train.precision import Precision

    precision = Precision(precision_name, "bench")
    return heldout_loss(model, val_rows, 8, False, pad_id, precision, torch.device("cpu"))


def checkpointing_active(model) -> bool:
    """Whether the trained model really recomputes activations (HF decoders set `gradient_checkpointing` on)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def after_first_step(cpu_marks: list[float], token_marks: list[int]) -> dict:
    """Load-robust figure: process CPU seconds and tokens of steps 2..N (marks taken after each step)."""
    if len(cpu_marks) < 2:
        return {"cpu_seconds_after_first": None, "tokens_after_first": None, "tok_per_cpu_s": None}
    cpu = cpu_marks[-1] - cpu_marks[0]
    tokens = token_marks[-1] - token_marks[0]
    return {"cpu_seconds_after_first": cpu, "tokens_after_first": tokens, "tok_per_cpu_s": tokens / max(cpu, 1e-9)}


# ------------------------------------------------------------------------------------ tunelab
# tunelab's two configurations, mirroring TRL's: its fastest (the default loop) and its memory-lean one (the same
# loop recomputing each decoder layer in the backward pass and handing freed memory back to the OS every step).
TUNELAB_CONFIGS = {
    "tunelab": {"gradient_checkpointing": False, "release_memory": False},
    "tunelab_lean": {"gradient_checkpointing": True, "release_memory": True},
}


def run_tunelab(spec: dict, train_rows: list, val_rows: list, workdir: Path, side: str = "tunelab") -> dict:
    from accelerate import Accelerator

    from tunelab.config import Config, EvalConfig
    from tunelab.models import load_tokenizer
    from tunelab.train.loop import train_lora
    from tunelab.train.precision import Precision
    from tunelab.train.recipe import build_lora_model, layer_surgery

    cfg = Config.model_validate(
        {
            "model": {"name": spec["model_path"]},
            "lora": spec["lora"],
            "train": {
                "output_dir": str(workdir / "run"),
                "max_steps": spec["steps"],
                "batch_size": spec["batch_size"],
                "grad_accum": 1,
                "lr": spec["lr"],
                "warmup_steps": spec["warmup_steps"],
                "weight_decay": spec["weight_decay"],
                "max_grad_norm": spec["max_grad_norm"],
                "max_seq_len": spec["max_seq_len"],
                "loss_chunk_tokens": spec.get("loss_chunk_tokens", 1024),
                "compile": spec.get("compile", False),
                **TUNELAB_CONFIGS[side],
                "precision": spec["precision"],
                "threads": spec["threads"],
                "save_steps": spec["steps"],
                "eval_steps": spec["steps"],
                "seed": spec["seed"],
            },
        }
    )
    precision = Precision(spec["precision"], "bench")
    tokenizer = load_tokenizer(cfg.model)
    model = build_lora_model(cfg, precision)
    cpu_marks, token_marks = [], []

    def progress(step, record):  # called after every optimizer step (logging_steps = 1)
        cpu_marks.append(time.process_time())
        token_marks.append(record["tokens"])

    layer_surgery(model, cfg.train)  # as the recipe does: fused or compiled layers
    result = train_lora(
        model,
        train_rows,
        val_rows[:1],
        cfg.train,
        EvalConfig(batch_size=8),
        workdir / "run",
        precision,
        tokenizer.pad_token_id,
        Accelerator(cpu=True),
        resume=False,
        log=lambda *_: None,
        progress=progress,
    )
    step_seconds = [h["step_s"] for h in result.history if "step_s" in h]
    training_peak = peak_rss_mib()  # before the held-out scoring below (see main)
    return {
        **after_first_step(cpu_marks, token_marks),
        "tokens": result.tokens,
        "train_seconds": result.train_seconds,
        "step_seconds": step_seconds,
        "val_loss": score(model, val_rows, spec["precision"], tokenizer.pad_token_id),
        "final_train_loss": result.final_train_loss,
        "loop_mfu": result.mfu,  # what the training loop itself logs (its own FLOP count and cached peak)
        "positions_computed": result.tokens,  # packed rows: no padding
        "gradient_checkpointing_active": checkpointing_active(model),
        "tunelab_settings": TUNELAB_CONFIGS[side],
        "training_peak_rss_mib": training_peak,
    }


# ---------------------------------------------------------------------------------------- TRL
# TRL's two configurations: the fastest one it documents for this job, and its memory-lean default.
TRL_CONFIGS = {
    # Gradient checkpointing off (no recomputation) and HF's length-grouped sampler (batches of similar lengths,
    # so little padding): the speed a user who tunes TRL for speed gets. Same conversations, another order.
    "trl": {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
    # TRL's default (gradient checkpointing on), in tunelab's order: the leanest TRL, and the same-order run.
    "trl_lean": {"gradient_checkpointing": True, "train_sampling_strategy": "sequential"},
}
# The lean sides hand freed memory back to the OS after every step (tunelab: `train.release_memory`); TRL gets the
# same call from a callback, so the memory ratio compares the tools, not allocator settings.
RELEASES_MEMORY = {"tunelab_lean", "trl_lean"}


def trl_settings(spec: dict, output_dir: str, config: str = "trl") -> dict:
    """SFTConfig arguments: TRL's defaults, plus what makes the job the same as tunelab's (see docs/benchmarks.md),
    plus the configuration's speed/memory choices (`TRL_CONFIGS`)."""
    bf16 = spec["precision"] == "bf16"
    return {
        "output_dir": output_dir,
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "linear",
        "warmup_steps": spec["warmup_steps"],
        "weight_decay": spec["weight_decay"],
        "max_grad_norm": spec["max_grad_norm"],
        "optim": "adamw_torch",
        "max_length": spec["max_seq_len"],
        "packing": False,  # TRL's packing on CPU has no per-conversation attention (padding-free needs flash-attn)
        "bf16": bf16,  # SFTConfig defaults to bf16=True; the fp32 comparison turns it off
        "model_init_kwargs": {"dtype": "bfloat16" if bf16 else "float32"},
        "use_cpu": True,
        "shuffle_dataset": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 10,
        "dataloader_num_workers": 0,
        "seed": spec["seed"],
        **TRL_CONFIGS[config],
    }


def reported_settings(settings: dict) -> dict:
    """The settings as the JSON reports them: SFTConfig's arguments plus `group_by_length` spelled out."""
    out = {k: v for k, v in settings.items() if k != "output_dir"}
    out["group_by_length"] = settings["train_sampling_strategy"] == "group_by_length"
    return out


def run_trl(spec: dict, train_rows: list, val_rows: list, workdir: Path, config: str = "trl") -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.config import ModelConfig
    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.models import load_tokenizer
    from tunelab.train.memory import release_free_heap

    rows = ordered_rows(train_rows, spec["steps"], spec["batch_size"], spec["seed"])
    # Pre-tokenised dataset: TRL turns `assistant_masks` into labels (-100 elsewhere), i.e. assistant-only loss.
    dataset = Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in rows],
            "assistant_masks": [[int(x != IGNORE_INDEX) for x in labels] for _, labels in rows],
        }
    )
    tokenizer = load_tokenizer(ModelConfig(name=spec["model_path"]))
    lora = spec["lora"]
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.cpu_marks: list[float] = []
            self.token_marks: list[int] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            if config in RELEASES_MEMORY:
                release_free_heap()  # inside the timed step, as in tunelab's loop
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())
            self.token_marks.append(counted["tokens"])

    counted = {"tokens": 0, "padded": 0}
    timer = StepTimer()
    trainer = SFTTrainer(
        model=spec["model_path"],
        args=SFTConfig(**trl_settings(spec, str(workdir / "trl"), config)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )

    def count_real_tokens(module, args, kwargs):  # what the model is actually fed, padding excluded
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        counted["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
        counted["padded"] += int(ids.numel()) if ids is not None else int(mask.numel())  # what it computes on

    model = trainer.model
    handle = model.register_forward_pre_hook(count_real_tokens, with_kwargs=True)
    trainer.train()
    handle.remove()
    step_seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    losses = [h.get("loss", h.get("train_loss")) for h in trainer.state.log_history if "loss" in h or "train_loss" in h]
    training_peak = peak_rss_mib()  # before the held-out scoring below (see main)
    return {
        **after_first_step(timer.cpu_marks, timer.token_marks),
        "tokens": counted["tokens"],
        "train_seconds": sum(step_seconds),
        "step_seconds": step_seconds,
        "val_loss": score(model, val_rows, spec["precision"], tokenizer.pad_token_id),
        "final_train_loss": losses[-1] if losses else None,
        "trl_settings": reported_settings(trl_settings(spec, "", config)),
        "positions_computed": counted["padded"],
        "gradient_checkpointing_active": checkpointing_active(model),
        "training_peak_rss_mib": training_peak,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=[*TUNELAB_CONFIGS, *TRL_CONFIGS], required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    from tunelab.train.recipe import set_threads

    threads = set_threads(spec["threads"])
    data = json.loads(Path(spec["data_file"]).read_text())
    train_rows = [tuple(r) for r in data["train"]]
    val_rows = [tuple(r) for r in data["val"]]
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.side}-") as tmp:
        if args.side in TUNELAB_CONFIGS:
            result = run_tunelab(spec, train_rows, val_rows, Path(tmp), args.side)
        else:
            result = run_trl(spec, train_rows, val_rows, Path(tmp), args.side)
    result.update(
        side=args.side,
        precision=spec["precision"],
        threads=threads,
        steps=spec["steps"],
        tok_per_s=result["tokens"] / max(result["train_seconds"], 1e-9),
        s_per_step=statistics.median(result["step_seconds"]) if result["step_seconds"] else None,
        # The side's memory is its peak up to the end of training (model load included). The held-out scoring
        # afterwards is the same code on every side and its logits chunks (~400 MiB) would hide the training's
        # peak and pull every ratio towards 1; the whole process's peak is kept beside it.
        peak_rss_mib=result.pop("training_peak_rss_mib"),
        process_peak_rss_mib=peak_rss_mib(),
        pid=os.getpid(),
        allocator_env={k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "ONEDNN_"))},
    )
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
