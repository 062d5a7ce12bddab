"""`tunelab train CONFIG`, read top to bottom: check -> data -> model -> loop -> save. A recipe is a plain function."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.io import atomic_folder, atomic_write
from tunelab.train.faults import maybe_inject_fault
from tunelab.train.precision import Precision, choose_precision
from tunelab.train.progress import ProgressBar
from tunelab.train.run_folder import check_run_dir, prepare_run_dir, write_failures_reported


def set_threads(threads: int | None) -> int:
    """Intra-op threads = cores (no oversubscription from tokenizers or dataloaders)."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return n


def build_lora_model(cfg: Config, precision: Precision):
    """Base model (frozen weights in the compute dtype) wrapped with fresh LoRA adapters (fp32)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunelab.models import load_model
    from tunelab.train.packed_attention import register as register_packed_attention

    quantized = cfg.model.load_in_4bit or cfg.model.load_in_8bit
    model = load_model(cfg.model, dtype=precision.dtype)
    if cfg.train.packing:
        model.config._attn_implementation = register_packed_attention()
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    torch.manual_seed(cfg.train.seed)  # LoRA init is part of what the seed fixes
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)  # PEFT keeps adapter weights in fp32 over a bf16 base
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def rows_of(dataset) -> list[tuple[list[int], list[int]]]:
    return list(zip(dataset["input_ids"], dataset["labels"]))


def check_hardware(cfg: Config) -> None:
    if cfg.train.optimizer == "adamw_8bit" and not torch.cuda.is_available():
        raise UserError("train.optimizer: adamw_8bit needs a CUDA GPU with bitsandbytes; this machine has none (use adamw)")
    from tunelab.models.loading import check_quantization_supported

    check_quantization_supported(cfg.model)


def run_training(cfg: Config, resume: bool = True, overwrite: bool = False, log=print) -> dict:
    from accelerate import Accelerator

    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.models import load_tokenizer
    from tunelab.train.loop import train_lora

    # check: hardware, run folder, model folder, chat template and data files before the run folder is
    # touched, so a config error leaves nothing behind.
    check_hardware(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    threads = set_threads(cfg.train.threads)
    check_run_dir(cfg, resume, overwrite)
    tokenizer = load_tokenizer(cfg.model)

    # data: one process prepares (and caches) it, the others read it
    with accelerator.main_process_first():
        data_dir = prepare_dataset(cfg, verbose=is_main)
        run_dir = prepare_run_dir(cfg, resume, overwrite) if is_main else Path(cfg.train.output_dir)
    precision = choose_precision(cfg.train.precision, accelerator.device.type)
    log(f"precision: {precision.name} ({precision.reason}); threads: {threads}")
    train_set, val_set = load_prepared(data_dir)
    train_rows, val_rows = rows_of(train_set), rows_of(val_set)[: cfg.eval.max_val_rows or None]
    log(f"data: {len(train_rows)} train / {len(val_rows)} val conversations from {data_dir}")

    # model
    model = build_lora_model(cfg, precision)
    started = time.time()

    with write_failures_reported(run_dir):
        # loop
        with ProgressBar(cfg.train.max_steps, enabled=is_main) as progress:
            result = train_lora(
                model, train_rows, val_rows, cfg.train, cfg.eval, run_dir, precision, tokenizer.pad_token_id,
                accelerator, resume=resume, log=log, progress=progress,
            )
        if not is_main:
            return {}

        # save: adapter, tokenizer, summary.json, each atomically
        model = accelerator.unwrap_model(model)
        with atomic_folder(run_dir / "adapter") as folder:
            model.save_pretrained(folder)
        maybe_inject_fault("final_save", result.steps)  # adapter written, tokenizer and summary not yet
        with atomic_folder(run_dir / "tokenizer") as folder:
            tokenizer.save_pretrained(folder)
        summary = {
            "base_model": cfg.model.name,
            "base_model_path": model.peft_config["default"].base_model_name_or_path,
            "precision": precision.name,
            "precision_reason": precision.reason,
            "threads": threads,
            "data_dir": str(data_dir),
            "train_rows": len(train_rows),
            "val_rows": len(val_rows),
            "steps": result.steps,
            "resumed_from_step": result.resumed_from,
            "tokens": result.tokens,
            "train_seconds": round(result.train_seconds, 2),
            "wall_seconds_this_session": round(time.time() - started, 2),
            "tokens_per_second": round(result.tokens_per_second, 2),
            "peak_rss_mib": round(result.peak_rss_mib, 1),
            # model FLOP utilisation of this session's steps (tunelab.train.flops) vs the measured matmul peak
            "mfu": None if result.mfu is None else round(result.mfu, 4),
            "matmul_peak_gflops": round(result.matmul_peak_gflops, 1) if result.matmul_peak_gflops else None,
            "model_tflops_this_session": round(result.flops_this_session / 1e12, 3),
            "final_train_loss": result.final_train_loss,
            "final_val_loss": result.final_val_loss,
        }
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    log(f"done: {run_dir} (val loss {result.final_val_loss:.4f}, {result.tokens_per_second:.0f} tok/s)")
    return summary
