"""The LoRA training loop: one plain function, readable top to bottom.

Data order is a pure function of (seed, step) (see batching.step_indices), so the "data position" of a
checkpoint is just its step number, and a resumed run replays exactly the batches an uninterrupted run
would have seen. Each optimizer step takes `batch_size x grad_accum` conversations; the loss is the sum
of assistant-token cross-entropies divided by the number of assistant tokens in the whole step, so
gradient accumulation (and DDP) give the same update as one big batch.
"""

from __future__ import annotations

import ctypes
import json
from contextlib import nullcontext
import os
import sys
import resource
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.config import EvalConfig, TrainConfig
from tunelab.eval.metrics import perplexity, validation_loss
from tunelab.train.batching import IGNORE, make_batch, step_indices
from tunelab.train.checkpoint import latest_valid_checkpoint, load_checkpoint, maybe_inject_fault, save_checkpoint
from tunelab.train.distributed import (
    AdapterSaver, average_adapter_grads, check_split, fsdp_validation_loss, is_fsdp, shard_base_only,
)
from tunelab.train.loss import AssistantLoss
from tunelab.train.precision import Precision

Example = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_second: float
    peak_rss_mib: float
    final_train_loss: float | None
    final_val_loss: float | None
    resumed_from: int | None = None
    history: list[dict] = field(default_factory=list)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def return_freed_tensors_to_the_os(threshold_bytes: int = 1 << 20) -> None:
    """Peak-RSS trick (glibc only): serve allocations >= 1 MiB with mmap, so freed activations go back to the OS.

    glibc raises its mmap threshold to the size of any mmapped block that is freed (up to 32 MiB), after which
    activations and temporaries of a few MiB come from the heap, fragment it and are never returned: measured
    5.07 -> 3.40 GB peak RSS for one 1765-token fp32 step of SmolLM2-135M. Fixing the threshold stops that.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, threshold_bytes)  # -3 = M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass  # not glibc (e.g. musl): nothing to tune


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward (autograd would also keep silu(gate))."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        return grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig


def lean_swiglu(model) -> None:
    """Peak-RSS trick: Llama-style MLPs (`down(silu(gate(x)) * up(x))`) use SwiGLU, one [tokens, 1536] activation
    per decoder layer less (about 320 MB for a 1765-token fp32 step of SmolLM2-135M); recomputing silu is cheap."""

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))

    for module in model.modules():
        act = type(getattr(module, "act_fn", None)).__name__
        if act in ("SiLU", "SiLUActivation") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(forward, module)


def build_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA weights only: no state for frozen ones
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fused: one kernel per parameter for the whole AdamW update (CPU and CUDA), instead of ~10 small ops each
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def build_scheduler(optimizer, cfg: TrainConfig):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


class MetricsLog:
    """metrics.jsonl (one line per event, flushed) + TensorBoard. On resume, lines past the checkpoint go."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self._truncate_after(resume_step)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
            self.file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by a crash
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def train_lora(
    model,
    train_rows: list[Example],
    val_rows: list[Example],
    cfg: TrainConfig,
    eval_cfg: EvalConfig,
    run_dir: Path,
    precision: Precision,
    pad_id: int,
    accelerator,
    resume: bool = True,
    log=print,
    progress=None,
) -> TrainResult:
    device = accelerator.device
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    check_split(cfg.batch_size, world)
    fsdp = is_fsdp(accelerator)
    per_step = cfg.batch_size * cfg.grad_accum
    return_freed_tensors_to_the_os()
    precision.skip_adapter_input_casts(model)
    lean_swiglu(model)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    start_step, tokens_seen, train_seconds, resumed_from = 0, 0, 0.0, None
    last_loss, last_val, history = None, None, []
    if resume and (ckpt := latest_valid_checkpoint(run_dir, warn=log)) is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        start_step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        last_loss, last_val = state.get("train_loss"), state.get("val_loss")
        resumed_from = start_step
        if start_step >= cfg.max_steps:
            log(f"run already complete: {ckpt} is step {start_step} of {cfg.max_steps}; nothing to train")
        else:
            log(f"resuming from {ckpt} (step {start_step} of {cfg.max_steps})")
    loss_module = AssistantLoss(model, cfg.loss_chunk_tokens)
    if fsdp:
        shard_base_only(accelerator, loss_module, model)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    model = accelerator.unwrap_model(loss_module).model  # on the device; DDP/FSDP hooks live on loss_module
    trainable = [p for p in model.parameters() if p.requires_grad]
    metrics = MetricsLog(run_dir, start_step, enabled=is_main)

    def evaluate(step: int) -> float:
        if fsdp:  # the base is sharded: only the wrapped module's forward gathers it
            loss = fsdp_validation_loss(loss_module, val_rows, eval_cfg.batch_size, cfg.packing, pad_id, precision, device)
        else:
            loss = validation_loss(model, val_rows, eval_cfg.batch_size, cfg.packing, pad_id, precision, device, cfg.loss_chunk_tokens)
        maybe_inject_fault("eval", step)  # evaluated, not yet recorded
        metrics.write({"step": step, "val_loss": loss, "val_ppl": perplexity(loss)})
        model.train()
        return loss

    model.train()
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        step_start = time.perf_counter()
        indices = step_indices(step, per_step, len(train_rows), seed=cfg.seed)
        step_rows = {i: train_rows[i] for i in indices}  # read once per step (rows live in memory-mapped Arrow)
        step_targets = sum(sum(1 for x in step_rows[i][1][1:] if x != IGNORE) for i in indices)
        # Every process takes its share of every micro-batch (rows rank, rank + world, ...): any batch size >= world
        # and any grad_accum give each process the same number of forward/backward passes.
        micro_batches = [indices[i : i + cfg.batch_size][rank::world] for i in range(0, per_step, cfg.batch_size)]
        loss_sum, step_tokens = torch.zeros((), device=device), 0
        for i, rows in enumerate(micro_batches):
            batch = make_batch([step_rows[r] for r in rows], cfg.packing, pad_id).to(device)
            sync = i == len(micro_batches) - 1  # DDP: all-reduce gradients once per optimizer step
            with accelerator.no_sync(loss_module) if not sync else nullcontext(), precision.autocast(device.type):
                micro_loss = loss_module(batch)
            # DDP averages gradients over processes; scale by world so the step equals one big batch.
            accelerator.backward(micro_loss * world / max(step_targets, 1))
            loss_sum += micro_loss.detach()
            step_tokens += batch.num_tokens
        if fsdp:
            average_adapter_grads(trainable, world)
        if cfg.max_grad_norm and fsdp:  # the adapter is whole (and equal) on every process
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        elif cfg.max_grad_norm:
            accelerator.clip_grad_norm_(loss_module.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        maybe_inject_fault("step", step + 1)  # weights updated, nothing recorded yet

        loss_sum, step_tokens = _reduce(accelerator, loss_sum, step_tokens)
        last_loss = loss_sum.item() / max(step_targets, 1)
        tokens_seen += step_tokens
        elapsed = time.perf_counter() - step_start
        train_seconds += elapsed
        window_tokens += step_tokens
        done = step + 1
        if done % cfg.logging_steps == 0 or done == cfg.max_steps:
            rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            record = {"step": done, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen, "tok_per_s": rate, "step_s": elapsed}
            metrics.write(record)
            maybe_inject_fault("metrics", done)  # step logged, no checkpoint yet
            history.append(record)
            window_tokens, window_start = 0, time.perf_counter()
            if progress is not None:
                progress(done, record)
        if done % cfg.eval_steps == 0 or done == cfg.max_steps:
            last_val = evaluate(done)
            history.append({"step": done, "val_loss": last_val})
            log(f"step {done}: val_loss {last_val:.4f}")
        if is_main and (done % cfg.save_steps == 0 or done == cfg.max_steps):
            state = {"tokens_seen": tokens_seen, "train_seconds": train_seconds, "val_loss": last_val, "train_loss": last_loss}
            save_checkpoint(run_dir, done, AdapterSaver(model) if fsdp else model, optimizer, scheduler, state, cfg.save_total_limit)
        accelerator.wait_for_everyone()

    metrics.close()
    if last_val is None:  # resumed a finished run whose checkpoint predates storing val_loss
        last_val = evaluate(cfg.max_steps)
    return TrainResult(
        steps=cfg.max_steps,
        tokens=tokens_seen,
        train_seconds=train_seconds,
        tokens_per_second=tokens_seen / max(train_seconds, 1e-9),
        peak_rss_mib=peak_rss_mib(),
        final_train_loss=last_loss,
        final_val_loss=last_val,
        resumed_from=resumed_from,
        history=history,
    )


def _reduce(accelerator, loss_sum: torch.Tensor, tokens: int):
    if accelerator.num_processes == 1:
        return loss_sum, tokens
    packed = torch.stack([loss_sum.float(), torch.tensor(float(tokens), device=loss_sum.device)])
    packed = accelerator.reduce(packed, reduction="sum")
    return packed[0], int(packed[1].item())
