"""The LoRA training loop: one plain function, readable top to bottom, with its optimizer and scheduler.

Data order is a pure function of (seed, step) (see batching.step_indices), so the "data position" of a
checkpoint is just its step number, and a resumed run replays exactly the batches an uninterrupted run
would have seen. Each optimizer step takes `batch_size x grad_accum` rows; the loss is the sum of the
micro-batch losses divided by the objective's weight of the whole step (sft: assistant tokens; dpo/kto:
rows, see objectives.py), so gradient accumulation (and DDP) give the same update as one big batch.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

from tunelab.config import EvalConfig, TrainConfig
from tunelab.errors import UserError
from tunelab.train.batching import step_indices
from tunelab.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from tunelab.train.distributed import (
    AdapterSaver,
    average_adapter_grads,
    check_split,
    fsdp_heldout_loss,
    is_fsdp,
    shard_base_only,
)
from tunelab.train.faults import maybe_inject_fault
from tunelab.train.flops import mfu, shape_of
from tunelab.train.fused_layers import fuse_decoder_layers
from tunelab.train.heldout import perplexity
from tunelab.train.memory import (
    bound_onednn_primitive_cache,
    peak_rss_mib,
    release_free_heap,
    return_freed_tensors_to_the_os,
)
from tunelab.train.objectives import make_objective
from tunelab.train.precision import Precision
from tunelab.train.progress import MetricsLog


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
    final_val_metrics: dict = field(default_factory=dict)  # the last held-out figures (objective-specific)
    history: list[dict] = field(default_factory=list)
    flops_this_session: float = 0.0  # model FLOPs (tunelab.train.flops) of the steps run in this process
    seconds_this_session: float = 0.0
    matmul_peak_gflops: float | None = None  # per process; MFU below is against peak x processes
    mfu: float | None = None


def build_optimizer(model, train_cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA weights only: no state for frozen ones
    if train_cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    # fused: one kernel per parameter for the whole AdamW update (CPU and CUDA), instead of ~10 small ops each
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)


def build_scheduler(optimizer, train_cfg: TrainConfig):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[train_cfg.scheduler]
    return get_scheduler(
        name, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=train_cfg.max_steps
    )


def train_lora(
    model,
    train_rows,
    val_rows,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    run_dir: Path,
    precision: Precision,
    pad_id: int,
    accelerator,
    resume: bool = True,
    log=print,
    progress=None,
) -> TrainResult:
    """Rows are what `objectives.objective_rows` gives for train_cfg.objective (sft: memory-mapped token rows)."""
    device = accelerator.device
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    check_split(train_cfg.batch_size, world)
    fsdp = is_fsdp(accelerator)
    if fsdp and train_cfg.objective != "sft":
        raise UserError(
            f"train.objective: {train_cfg.objective} is not supported under FSDP yet (use DDP or one process)"
        )
    per_step = train_cfg.batch_size * train_cfg.grad_accum
    objective = make_objective(train_rows, val_rows, train_cfg, eval_cfg, pad_id, precision)
    if train_cfg.release_memory:
        return_freed_tensors_to_the_os()
    bound_onednn_primitive_cache()
    if train_cfg.compile:
        from tunelab.train.compile import compile_decoder_layers

        compile_decoder_layers(model)  # inductor fuses and picks what the backward keeps: no hand-made functions
    else:
        fuse_decoder_layers(model)  # LoRA linears, RMSNorms, SwiGLU: the same numbers, fewer passes (fused_layers.py)
    shape = shape_of(model)
    peak_flops = _matmul_peak_gflops(precision, device) * 1e9 * world
    session_flops, session_seconds, window_flops = 0.0, 0.0, 0.0

    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    scaler = precision.grad_scaler(device.type)  # fp16: dynamic loss scaling; otherwise a pass-through
    start_step, tokens_seen, train_seconds, resumed_from = 0, 0, 0.0, None
    last_loss, last_val, last_figures, history = None, None, {}, []
    if resume and (ckpt := latest_valid_checkpoint(run_dir, warn=log)) is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        if state.get("grad_scaler"):  # fp16: the loss scale and its growth count go on where they were
            scaler.load_state_dict(state["grad_scaler"])
        start_step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        last_loss, last_val, last_figures = state.get("train_loss"), state.get("val_loss"), state.get("val_metrics", {})
        resumed_from = start_step
        if start_step >= train_cfg.max_steps:
            log(f"run already complete: {ckpt} is step {start_step} of {train_cfg.max_steps}; nothing to train")
        else:
            log(f"resuming from {ckpt} (step {start_step} of {train_cfg.max_steps})")
    loss_module = objective.loss_module(model)
    if fsdp:
        shard_base_only(accelerator, loss_module, model)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    model = accelerator.unwrap_model(loss_module).model  # on the device; DDP/FSDP hooks live on loss_module
    trainable = [p for p in model.parameters() if p.requires_grad]
    metrics = MetricsLog(run_dir, start_step, enabled=is_main)

    def evaluate(step: int) -> dict:
        if fsdp:  # the base is sharded: only the wrapped module's forward gathers it
            loss = fsdp_heldout_loss(
                loss_module, val_rows, eval_cfg.batch_size, train_cfg.packing, pad_id, precision, device
            )
            figures = {"val_loss": loss, "val_ppl": perplexity(loss)}
        else:
            figures = objective.evaluate(model, device)
        maybe_inject_fault("eval", step)  # evaluated, not yet recorded
        metrics.write({"step": step, **figures})
        model.train()
        return figures

    # bf16: PEFT would cast each LoRA layer's bf16 input to fp32 (the adapter's dtype) only for autocast to cast
    # it straight back: a copy per adapted layer per step that autograd keeps. Everything below runs under autocast.
    with disable_input_dtype_casting(model, active=precision.name == "bf16"):
        model.train()
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(start_step, train_cfg.max_steps):
            step_start = time.perf_counter()
            indices = step_indices(step, per_step, len(train_rows), seed=train_cfg.seed)
            step_weight = objective.step_weight(indices)
            step_flops = objective.step_flops(shape, indices, step_weight)
            # Every process takes its share of every micro-batch (rows rank, rank + world, ...): any batch size >= world
            # and any grad_accum give each process the same number of forward/backward passes.
            micro_batches = [
                indices[i : i + train_cfg.batch_size][rank::world] for i in range(0, per_step, train_cfg.batch_size)
            ]
            loss_sum, step_tokens = torch.zeros((), device=device), 0
            for i, rows in enumerate(micro_batches):
                inputs, tokens = objective.micro_batch(rows, device)
                sync = i == len(micro_batches) - 1  # DDP: all-reduce gradients once per optimizer step
                with accelerator.no_sync(loss_module) if not sync else nullcontext(), precision.autocast(device.type):
                    micro_loss = loss_module(inputs)
                # DDP averages gradients over processes; scale by world so the step equals one big batch.
                accelerator.backward(scaler.scale(micro_loss * world / max(step_weight, 1)))
                loss_sum += micro_loss.detach()
                step_tokens += tokens
            if fsdp:
                average_adapter_grads(trainable, world)
            if train_cfg.max_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                if fsdp:  # the adapter is whole (and equal) on every process
                    torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
                else:
                    accelerator.clip_grad_norm_(loss_module.parameters(), train_cfg.max_grad_norm)
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if train_cfg.release_memory:
                release_free_heap()
            maybe_inject_fault("step", step + 1)  # weights updated, nothing recorded yet

            loss_sum, step_tokens = _reduce(accelerator, loss_sum, step_tokens)
            last_loss = loss_sum.item() / max(step_weight, 1)
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - step_start
            train_seconds += elapsed
            window_tokens += step_tokens
            window_flops += step_flops
            session_flops += step_flops
            session_seconds += elapsed
            done = step + 1
            if done % train_cfg.logging_steps == 0 or done == train_cfg.max_steps:
                window_s = max(time.perf_counter() - window_start, 1e-9)
                rate = window_tokens / window_s
                record = {
                    "step": done,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": tokens_seen,
                    "tok_per_s": rate,
                    "step_s": elapsed,
                    "mfu": mfu(window_flops, window_s, peak_flops),
                }
                metrics.write(record)
                maybe_inject_fault("metrics", done)  # step logged, no checkpoint yet
                history.append(record)
                window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
                if progress is not None:
                    progress(done, record)
            if done % train_cfg.eval_steps == 0 or done == train_cfg.max_steps:
                last_figures = evaluate(done)
                last_val = last_figures["val_loss"]
                history.append({"step": done, **last_figures})
                log(f"step {done}: val_loss {last_val:.4f}")
            if is_main and (done % train_cfg.save_steps == 0 or done == train_cfg.max_steps):
                state = {
                    "tokens_seen": tokens_seen,
                    "train_seconds": train_seconds,
                    "val_loss": last_val,
                    "train_loss": last_loss,
                    "val_metrics": last_figures,
                    "grad_scaler": scaler.state_dict(),
                }
                save_checkpoint(
                    run_dir,
                    done,
                    AdapterSaver(model) if fsdp else model,
                    optimizer,
                    scheduler,
                    state,
                    train_cfg.save_total_limit,
                )
            accelerator.wait_for_everyone()

        if last_val is None:  # resumed a finished run whose checkpoint predates storing val_loss
            last_figures = evaluate(train_cfg.max_steps)
            last_val = last_figures["val_loss"]
        metrics.close()  # after the last write: a finished run's extra evaluation must not hit a closed log
    return TrainResult(
        steps=train_cfg.max_steps,
        tokens=tokens_seen,
        train_seconds=train_seconds,
        tokens_per_second=tokens_seen / max(train_seconds, 1e-9),
        peak_rss_mib=peak_rss_mib(),
        final_train_loss=last_loss,
        final_val_loss=last_val,
        resumed_from=resumed_from,
        history=history,
        final_val_metrics=last_figures,
        flops_this_session=session_flops,
        seconds_this_session=session_seconds,
        matmul_peak_gflops=peak_flops / world / 1e9,
        mfu=mfu(session_flops, session_seconds, peak_flops) if session_seconds else None,
    )


def _matmul_peak_gflops(precision: Precision, device: torch.device) -> float:
    """The measured matmul peak of this machine in the training precision (cached per machine, dtype, threads)."""
    from tunelab.train.matmul_peak import matmul_peak

    return matmul_peak(precision.dtype, torch.get_num_threads(), device=device)["gflops"]


def _reduce(accelerator, loss_sum: torch.Tensor, tokens: int):
    if accelerator.num_processes == 1:
        return loss_sum, tokens
    packed = torch.stack([loss_sum.float(), torch.tensor(float(tokens), device=loss_sum.device)])
    packed = accelerator.reduce(packed, reduction="sum")
    return packed[0], int(packed[1].item())
