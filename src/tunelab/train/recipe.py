"""`tunelab train CONFIG`, read top to bottom: check -> data -> model -> loop -> save. A recipe is a plain function.

The model step ends with the layer surgery (`layer_surgery`: compiled, fused or as built), so the loop trains
whatever model it is given."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tunelab.config import Config, TrainConfig
from tunelab.hardware import usable_cores
from tunelab.io import atomic_folder, atomic_write
from tunelab.train.architectures import plan_for
from tunelab.train.distributed import describe_launch, distribution_for
from tunelab.train.faults import maybe_inject_fault
from tunelab.train.precision import Precision, precision_for_this_machine
from tunelab.train.progress import ProgressBar
from tunelab.train.run_folder import (
    check_run_dir,
    check_same_data,
    data_fingerprint,
    prepare_run_dir,
    write_failures_reported,
)


def set_threads(threads: int | None) -> int:
    """Intra-op threads = cores (no oversubscription from tokenizers or dataloaders)."""
    n = threads or usable_cores()
    torch.set_num_threads(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return n


def peft_lora_config(cfg: Config):
    """PEFT's LoraConfig for the config's `lora` section (causal LM)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def build_lora_model(cfg: Config, precision: Precision, log=lambda *_: None):
    """Base model (frozen weights in the compute dtype) wrapped with fresh LoRA adapters (fp32), switched to the
    packed attention when its architecture takes tunelab's fast path (see tunelab.train.architectures)."""
    from peft import get_peft_model

    from tunelab.models import load_model
    from tunelab.train.architectures import use_plan

    model = load_model(cfg.model, dtype=precision.dtype)
    # Not PEFT's prepare_model_for_kbit_training for a 4/8-bit base: it casts every unquantised weight to fp32,
    # which doubles a bf16 run's embedding (Llama-3.2-1B's tied 128256x2048: 501 -> 1002 MiB). The frozen weights
    # stay in the compute dtype, as over an unquantised base; what else it does is freezing the base (below) and,
    # for gradient checkpointing, input embeddings that require grad (done at the end for every base).
    model.requires_grad_(False)
    torch.manual_seed(cfg.train.seed)  # LoRA init is part of what the seed fixes
    try:
        model = get_peft_model(model, peft_lora_config(cfg))  # PEFT keeps adapter weights in fp32 over a bf16 base
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        from tunelab.config import ConfigError

        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"lora.target_modules: {cfg.lora.target_modules!r} gives no adapter: {first}") from None
    use_plan(model, cfg.train.packing, log)  # after PEFT: an adapter on lm_head rules the fast path out
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def layer_surgery(model, train_cfg: TrainConfig) -> str:
    """How the decoder layers run in training, decided once, before the loop: "compiled" (`train.compile`:
    torch.compile of each layer's norms and MLP, inductor fuses and picks what the backward keeps), "fused"
    (`train.fused_layers`: LoRA linears, RMSNorms and SwiGLU through hand-written autograd functions, the same
    numbers in fewer passes, see fused_layers.py) or "modules" (PEFT's and transformers' own forwards)."""
    if train_cfg.compile:
        from tunelab.train.compile import compile_decoder_layers

        compile_decoder_layers(model)
        return "compiled"
    if train_cfg.fused_layers:
        from tunelab.train.fused_layers import fuse_decoder_layers

        fuse_decoder_layers(model)
        return "fused"
    return "modules"


def rows_of(dataset):
    """(input_ids, labels) rows of a prepared split, read on demand from the memory-mapped Arrow data."""
    from tunelab.data.prepare import TokenRows

    return TokenRows(dataset)


def check_hardware(cfg: Config) -> None:
    """bitsandbytes runs what the config asks of it on this machine (CPU or CUDA), or one line says what it lacks."""
    from tunelab.models.quantization import check_bitsandbytes, check_quantization_supported

    if cfg.train.optimizer == "adamw_8bit":
        check_bitsandbytes("train.optimizer: adamw_8bit", "adamw_8bit")
    check_quantization_supported(cfg.model)


def resumes_a_run(cfg: Config, resume: bool) -> bool:
    """True when this start continues a run folder that has a checkpoint (the loop resumes from the newest valid
    one)."""
    from tunelab.train.checkpoint import list_checkpoints

    return resume and bool(list_checkpoints(Path(cfg.train.output_dir)))


def run_training(
    cfg: Config, resume: bool = True, overwrite: bool = False, extend: bool = False, log=print, preflight=None
) -> dict:
    """`preflight(cfg, data_dir, tokenizer, model, log)`, when given, runs once the LoRA model is built and before
    the run folder is written (`tunelab train` passes the doctor's pre-training checks; it raises to stop)."""
    from accelerate import Accelerator

    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.models import load_tokenizer
    from tunelab.train.loop import train_lora
    from tunelab.train.objectives import objective_rows

    # check: hardware, run folder, model folder, chat template and data files before the run folder is
    # touched, so a config error leaves nothing behind.
    check_hardware(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    threads = set_threads(cfg.train.threads)
    check_run_dir(cfg, resume, overwrite, extend)
    tokenizer = load_tokenizer(cfg.model)

    # data: one process prepares (and caches) it, the others read it
    with accelerator.main_process_first():
        data_dir = prepare_dataset(cfg, verbose=is_main)
    train_set, val_set = load_prepared(data_dir)
    data_print = data_fingerprint(train_set)
    check_same_data(cfg, data_print, resume)
    precision = precision_for_this_machine(cfg.train.precision, accelerator.device.type)

    # model, and the pre-training checks on it and the data, before the run folder is touched
    model = build_lora_model(cfg, precision, log)
    if preflight is not None and resumes_a_run(cfg, resume):
        # The checks ran when the run started, and a resume refuses changed settings or data; running them again
        # would put their forward/backward passes into a resumed process only, which then no longer continues
        # bit for bit where the interrupted one stopped (seen on a 4-bit base).
        log("doctor: pre-training checks skipped on resume (they ran when the run started)")
    elif preflight is not None:
        preflight(cfg, data_dir, tokenizer, model, log)
    with accelerator.main_process_first():
        run_dir = prepare_run_dir(cfg, resume, overwrite, data_print, extend) if is_main else Path(cfg.train.output_dir)
    if cfg.train.packing and not plan_for(model).fast:  # the fallback pads: one conversation per row
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"packing": False})})
    if extend:
        log(
            f"--extend: continuing to step {cfg.train.max_steps}; the {cfg.train.scheduler} learning-rate schedule is "
            f"recomputed over {cfg.train.max_steps} steps from the last checkpoint on"
        )
    log(
        f"{describe_launch(accelerator, cfg.train.batch_size, cfg.train.grad_accum)}; "
        f"precision: {precision.name} ({precision.reason}); threads: {threads}"
    )
    objective = cfg.train.objective
    train_rows = objective_rows(objective, train_set)
    val_rows = objective_rows(objective, val_set)[: cfg.eval.max_val_rows or None]
    log(
        f"data: {len(train_rows)} train / {len(val_rows)} val "
        f"{'conversations' if objective == 'sft' else objective + ' rows'} from {data_dir}"
    )

    # the reference log-probs of the base model for dpo/kto: once, cached with the data
    if objective != "sft":
        from tunelab.train.reference import attach_reference_logps

        with accelerator.main_process_first():
            attach_reference_logps(
                cfg,
                data_dir,
                model,
                {"train": train_rows, "val": val_rows},
                precision,
                tokenizer.pad_token_id,
                next(model.parameters()).device,
                log,
            )
    val_rows = val_rows[: cfg.eval.max_val_rows or None]
    layer_surgery(model, cfg.train)  # after the reference log-probs: the base model ran as loaded for those
    started = time.time()

    with write_failures_reported(run_dir):
        # loop
        with ProgressBar(cfg.train.max_steps, enabled=is_main) as progress:
            result = train_lora(
                model,
                train_rows,
                val_rows,
                cfg.train,
                cfg.eval,
                run_dir,
                precision,
                tokenizer.pad_token_id,
                accelerator,
                resume=resume,
                log=log,
                progress=progress,
            )
        if not is_main:
            return {}

        # save: adapter, tokenizer, summary.json, each atomically
        model = accelerator.unwrap_model(model)
        with atomic_folder(run_dir / "adapter") as folder:
            distribution_for(accelerator, cfg.train).saveable(model).save_pretrained(folder)
        maybe_inject_fault("final_save", result.steps)  # adapter written, tokenizer and summary not yet
        with atomic_folder(run_dir / "tokenizer") as folder:
            tokenizer.save_pretrained(folder)
        summary = {
            "base_model": cfg.model.name,
            "base_model_path": model.peft_config["default"].base_model_name_or_path,
            "precision": precision.name,
            "precision_reason": precision.reason,
            "threads": threads,
            "processes": accelerator.num_processes,
            "distributed": str(accelerator.distributed_type).split(".")[-1],
            "global_batch": cfg.train.batch_size * cfg.train.grad_accum,
            "data_dir": str(data_dir),
            "data_fingerprint": data_print,
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
            "objective": objective,
            "final_val_metrics": result.final_val_metrics,
        }
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    log(f"done: {run_dir} (val loss {result.final_val_loss:.4f}, {result.tokens_per_second:.0f} tok/s)")
    return summary
