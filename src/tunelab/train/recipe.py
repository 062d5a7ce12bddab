"""`tunelab train CONFIG`: data -> model + LoRA -> loop -> run folder. A recipe is a plain function."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.train.precision import Precision, choose_precision

# Keys that may change between an interrupted run and its resumption without changing the maths.
RESUME_SAFE_TRAIN_KEYS = {
    "max_steps", "save_steps", "save_total_limit", "eval_steps", "logging_steps", "threads", "output_dir", "loss_chunk_tokens",
}


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


def rows_of(dataset):
    """(input_ids, labels) rows of a prepared split, read on demand from the memory-mapped Arrow data."""
    from tunelab.data.prepare import TokenRows

    return TokenRows(dataset)


def check_hardware(cfg: Config) -> None:
    if cfg.train.optimizer == "adamw_8bit" and not torch.cuda.is_available():
        raise UserError("train.optimizer: adamw_8bit needs a CUDA GPU with bitsandbytes; this machine has none (use adamw)")
    from tunelab.models.loading import check_quantization_supported

    check_quantization_supported(cfg.model)


def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Refuse an unusable run folder before anything is written (prepare_run_dir writes)."""
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir: {run_dir} exists and is not a folder")
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if existing and not resume and not overwrite:
        raise UserError(f"{run_dir}: run folder already exists; pass --overwrite to replace it, or drop --no-resume to resume it")
    if existing and resume and (run_dir / "config.yaml").is_file():
        from tunelab.config import load_config

        difference = _first_difference(load_config(run_dir / "config.yaml"), cfg)
        if difference:
            raise UserError(
                f"{run_dir}: holds a run with a different config ({difference}); use another train.output_dir, or --no-resume --overwrite"
            )
    return run_dir


# Temp names of write_text_atomic / save_folder_atomic that a SIGKILL can leave behind in the run folder.
_LEFTOVER_GLOBS = (".config.yaml.*", ".summary.json.*", ".adapter.*", ".tokenizer.*", "metrics.jsonl.tmp")


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    run_dir = check_run_dir(cfg, resume, overwrite)
    try:
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for pattern in _LEFTOVER_GLOBS:
            for leftover in run_dir.glob(pattern):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder: {exc.strerror or exc}") from None
    return run_dir


def _first_difference(old: Config, new: Config) -> str | None:
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for section in ("data", "model", "lora", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if section == "train" and key in RESUME_SAFE_TRAIN_KEYS:
                continue
            if a[section].get(key) != b[section].get(key):
                return f"{section}.{key}: {a[section].get(key)!r} -> {b[section].get(key)!r}"
    return None


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_folder_atomic(path: Path, write) -> None:
    """`write(tmp_folder)` then rename over `path`: readers never see a half-written folder."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_training(cfg: Config, resume: bool = True, overwrite: bool = False, log=print) -> dict:
    check_hardware(cfg)
    from accelerate import Accelerator

    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.models import load_tokenizer

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    threads = set_threads(cfg.train.threads)
    check_run_dir(cfg, resume, overwrite)
    # Model folder, chat template and data files are checked before the run folder is touched:
    # a config error leaves nothing behind.
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():  # one process prepares (and caches) the data, the others read it
        data_dir = prepare_dataset(cfg, verbose=accelerator.is_main_process)
        run_dir = prepare_run_dir(cfg, resume, overwrite) if accelerator.is_main_process else Path(cfg.train.output_dir)
    precision = choose_precision(cfg.train.precision, accelerator.device.type)
    from tunelab.train.distributed import describe_launch

    log(f"{describe_launch(accelerator, cfg.train.batch_size, cfg.train.grad_accum)}; precision: {precision.name} ({precision.reason}); threads: {threads}")

    train_set, val_set = load_prepared(data_dir)
    train_rows, val_rows = rows_of(train_set), rows_of(val_set)
    if cfg.eval.max_val_rows:
        val_rows = val_rows[: cfg.eval.max_val_rows]
    log(f"data: {len(train_rows)} train / {len(val_rows)} val conversations from {data_dir}")

    model = build_lora_model(cfg, precision)
    started = time.time()
    try:
        return _train_and_save(cfg, model, tokenizer, train_rows, val_rows, run_dir, data_dir, precision, accelerator,
                               threads, resume, log, started)
    except Exception as exc:
        from tunelab.train.checkpoint import write_failure_reason

        reason = None if isinstance(exc, UserError) else write_failure_reason(exc, run_dir)
        if reason is None:
            raise
        where = getattr(exc, "filename", None) or run_dir
        raise UserError(
            f"{where}: cannot write to the run folder: {reason} (checkpoints in {run_dir / 'checkpoints'} are intact; "
            "fix it and re-run the same command to resume)"
        ) from None


def _train_and_save(cfg, model, tokenizer, train_rows, val_rows, run_dir, data_dir, precision, accelerator, threads,
                    resume, log, started) -> dict:
    from tunelab.train.checkpoint import maybe_inject_fault
    from tunelab.train.loop import train_lora

    with _progress_bar(cfg.train.max_steps, enabled=accelerator.is_main_process) as progress:
        result = train_lora(
            model, train_rows, val_rows, cfg.train, cfg.eval, run_dir, precision, tokenizer.pad_token_id,
            accelerator, resume=resume, log=log, progress=progress,
        )
    if not accelerator.is_main_process:
        return {}
    from tunelab.train.distributed import AdapterSaver, is_fsdp

    model = accelerator.unwrap_model(model)
    save_folder_atomic(run_dir / "adapter", (AdapterSaver(model) if is_fsdp(accelerator) else model).save_pretrained)
    maybe_inject_fault("final_save", result.steps)  # adapter written, tokenizer and summary not yet
    save_folder_atomic(run_dir / "tokenizer", tokenizer.save_pretrained)
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
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "tokens": result.tokens,
        "train_seconds": round(result.train_seconds, 2),
        "wall_seconds_this_session": round(time.time() - started, 2),
        "tokens_per_second": round(result.tokens_per_second, 2),
        "peak_rss_mib": round(result.peak_rss_mib, 1),
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    log(f"done: {run_dir} (val loss {result.final_val_loss:.4f}, {result.tokens_per_second:.0f} tok/s)")
    return summary


class _progress_bar:
    """A rich progress bar with loss, lr, tokens/s and ETA; `progress(step, record)` updates it."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=self.total, info="")
        return self.update

    def update(self, step: int, record: dict) -> None:
        info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tok_per_s']:.0f} tok/s"
        self.bar.update(self.task, completed=step, info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
