"""The LoRA training loop: one plain function, readable top to bottom, with its optimizer and scheduler.

Around the step, three helpers keep the function to the step itself: the distribution strategy (one process,
DDP or FSDP: train/distributed.py), the throughput meter (tokens/s, MFU: train/progress.py) and the run's
progress (`RunProgress`: the counters a checkpoint carries). How the decoder layers run (fused, compiled or
as built) is decided before the loop, by the recipe (`recipe.layer_surgery`).

Data order is a pure function of (seed, step) (see batching.step_indices), so the "data position" of a
checkpoint is just its step number, and a resumed run replays exactly the batches an uninterrupted run
would have seen. Each optimizer step takes `batch_size x grad_accum` rows; the loss is the sum of the
micro-batch losses divided by the objective's weight of the whole step (sft: assistant tokens; dpo/kto:
rows, see objectives.py), so gradient accumulation (and DDP) give the same update as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

from tunelab.config import EvalConfig, TrainConfig
from tunelab.train.batching import step_indices
from tunelab.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from tunelab.train.distributed import distribution_for
from tunelab.train.faults import maybe_inject_fault
from tunelab.train.memory import configure_allocator, peak_rss_mib, release_free_heap
from tunelab.train.objectives import make_objective
from tunelab.train.precision import Precision
from tunelab.train.progress import MetricsLog, ThroughputMeter


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


@dataclass
class RunProgress:
    """Where a run stands: the step it starts from, the counters and last figures a checkpoint's state.json carries."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    train_loss: float | None = None
    val_loss: float | None = None
    val_metrics: dict = field(default_factory=dict)
    resumed_from: int | None = None
    history: list[dict] = field(default_factory=list)

    def checkpoint_state(self, scaler) -> dict:
        return {
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "val_loss": self.val_loss,
            "train_loss": self.train_loss,
            "val_metrics": self.val_metrics,
            "grad_scaler": scaler.state_dict(),  # fp16: the loss scale and its growth count go on where they were
        }

    def result(self, steps: int, meter: ThroughputMeter) -> TrainResult:
        return TrainResult(
            steps=steps,
            tokens=self.tokens_seen,
            train_seconds=self.train_seconds,
            tokens_per_second=self.tokens_seen / max(self.train_seconds, 1e-9),
            peak_rss_mib=peak_rss_mib(),
            final_train_loss=self.train_loss,
            final_val_loss=self.val_loss,
            resumed_from=self.resumed_from,
            history=self.history,
            final_val_metrics=self.val_metrics,
            flops_this_session=meter.session_flops,
            seconds_this_session=meter.session_seconds,
            matmul_peak_gflops=meter.matmul_peak_gflops,
            mfu=meter.session_mfu(),
        )


def starting_progress(
    resume: bool, run_dir: Path, model, optimizer, scheduler, scaler, max_steps: int, log=print
) -> RunProgress:
    """Where the run starts: with `resume`, the newest valid checkpoint restored into model, optimizer, scheduler and
    loss scaler; a fresh start without one."""
    ckpt = latest_valid_checkpoint(run_dir, warn=log) if resume else None
    if ckpt is None:
        return RunProgress()
    state = load_checkpoint(ckpt, model, optimizer, scheduler)
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    step = state["step"]
    if step >= max_steps:
        log(f"run already complete: {ckpt} is step {step} of {max_steps}; nothing to train")
    else:
        log(f"resuming from {ckpt} (step {step} of {max_steps})")
    return RunProgress(
        step=step,
        tokens_seen=state["tokens_seen"],
        train_seconds=state["train_seconds"],
        train_loss=state.get("train_loss"),
        val_loss=state.get("val_loss"),
        val_metrics=state.get("val_metrics", {}),
        resumed_from=step,
    )


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
    """Train `model` (its layers as the recipe prepared them) from the newest checkpoint, if `resume`, to max_steps.
    Rows are what `objectives.objective_rows` gives for train_cfg.objective (sft: memory-mapped token rows)."""
    strategy = distribution_for(accelerator, train_cfg)
    device, world, per_step = accelerator.device, strategy.world, train_cfg.batch_size * train_cfg.grad_accum
    objective = make_objective(train_rows, val_rows, train_cfg, eval_cfg, pad_id, precision)
    configure_allocator(train_cfg.release_memory)
    meter = ThroughputMeter.for_model(model, precision, device, world)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    scaler = precision.grad_scaler(device.type)  # fp16: dynamic loss scaling; otherwise a pass-through
    run = starting_progress(resume, run_dir, model, optimizer, scheduler, scaler, train_cfg.max_steps, log)
    loss_module, optimizer, model = strategy.prepare(objective.loss_module(model), optimizer)
    metrics = MetricsLog(run_dir, run.step, enabled=accelerator.is_main_process)

    def evaluate(step: int) -> None:
        run.val_metrics = strategy.evaluate(objective, model, device)
        run.val_loss = run.val_metrics["val_loss"]
        maybe_inject_fault("eval", step)  # evaluated, not yet recorded
        metrics.write({"step": step, **run.val_metrics})
        model.train()

    # bf16: no cast of each LoRA input to fp32 and straight back by autocast (a copy per layer that autograd keeps)
    with disable_input_dtype_casting(model, active=precision.name == "bf16"):
        model.train()
        for step in range(run.step, train_cfg.max_steps):
            meter.start_step()
            indices = step_indices(step, per_step, len(train_rows), seed=train_cfg.seed)
            step_weight = objective.step_weight(indices)
            step_flops = objective.step_flops(meter.shape, indices, step_weight)
            micro_batches = strategy.micro_batches(indices, train_cfg.batch_size)
            loss_sum, step_tokens = torch.zeros((), device=device), 0
            for i, rows in enumerate(micro_batches):
                inputs, tokens = objective.micro_batch(rows, device)
                with strategy.accumulating(last=i == len(micro_batches) - 1), precision.autocast(device.type):
                    micro_loss = loss_module(inputs)
                # the processes' gradients are averaged: x world, so the step equals one big batch
                strategy.backward(scaler.scale(micro_loss * world / max(step_weight, 1)))
                loss_sum += micro_loss.detach()
                step_tokens += tokens
            strategy.finish_gradients(optimizer, scaler, train_cfg.max_grad_norm)
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if train_cfg.release_memory:
                release_free_heap()
            maybe_inject_fault("step", step + 1)  # weights updated, nothing recorded yet

            loss_sum, step_tokens = strategy.reduce(loss_sum, step_tokens)
            run.train_loss = loss_sum.item() / max(step_weight, 1)
            run.tokens_seen += step_tokens
            run.train_seconds += meter.end_step(step_tokens, step_flops)
            done = step + 1
            if done % train_cfg.logging_steps == 0 or done == train_cfg.max_steps:
                lr = scheduler.get_last_lr()[0]
                record = {"step": done, "loss": run.train_loss, "lr": lr, "tokens": run.tokens_seen, **meter.window()}
                metrics.write(record)
                maybe_inject_fault("metrics", done)  # step logged, no checkpoint yet
                run.history.append(record)
                if progress is not None:
                    progress(done, record)
            if done % train_cfg.eval_steps == 0 or done == train_cfg.max_steps:
                evaluate(done)
                run.history.append({"step": done, **run.val_metrics})
                log(f"step {done}: val_loss {run.val_loss:.4f}")
            if accelerator.is_main_process and (done % train_cfg.save_steps == 0 or done == train_cfg.max_steps):
                state = run.checkpoint_state(scaler)
                save_checkpoint(
                    run_dir, done, strategy.saveable(model), optimizer, scheduler, state, train_cfg.save_total_limit
                )
            strategy.wait()

        if run.val_loss is None:  # resumed a finished run whose checkpoint predates storing val_loss
            evaluate(train_cfg.max_steps)
        metrics.close()  # after the last write: a finished run's extra evaluation must not hit a closed log
    return run.result(train_cfg.max_steps, meter)
