"""Training on several processes (accelerate): the loop's distribution strategy, for one process, DDP or FSDP.

`distribution_for(accelerator)` gives the loop one object that knows how the processes share the work: which
rows of a micro-batch this process takes, when gradients are synchronised, how they are completed and clipped,
how per-step figures are summed, how held-out figures are computed and what a checkpoint saves. The loop itself
has no branch on the kind of run.

- `DataParallel` (one process, or DDP): every process holds the whole model; accelerate's DDP wrapper all-reduces
  the gradients in the backward of the step's last micro-batch (`no_sync` before).
- `ShardedBase` (FSDP): the frozen base weights are sharded across processes (what makes a 3B+ model fit), while
  the LoRA modules are left out of FSDP (`ignored_modules`): every process holds the full, tiny adapter, so the
  optimizer, checkpoints and the final save work exactly as in one process. Their gradients are averaged here,
  once per optimizer step, as DDP would. Two things must not run through FSDP's own hooks:
  - evaluation calls the FSDP-wrapped loss module (the root gathers the shards it needs), not the bare model;
  - saving takes the adapter from the LoRA parameters alone: `state_dict()` through FSDP wrappers gathers across
    processes, and only the main process saves.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from tunelab.errors import UserError

_LORA_MODULES = r".*\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)"  # PEFT's adapter sub-modules
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == "FSDP"


def describe_launch(accelerator, batch_size: int, grad_accum: int) -> str:
    """One line saying how many processes ran and what one optimizer step holds."""
    world = accelerator.num_processes
    kind = str(accelerator.distributed_type).split(".")[-1]
    return (
        f"processes: {world} ({kind}); global batch: {batch_size * grad_accum} conversations per optimizer step "
        f"(batch_size {batch_size} x grad_accum {grad_accum}, "
        f"each micro-batch split over {world} process{'es' * (world > 1)})"
    )


def check_split(batch_size: int, world: int) -> None:
    """Each process takes a share of every micro-batch; a process with no rows would stall the others."""
    if batch_size < world:
        raise UserError(
            f"train.batch_size: {batch_size} is smaller than the number of processes ({world}); "
            f"use train.batch_size >= {world} (the global batch is split across processes)"
        )


def shard_base_only(accelerator, loss_module, model) -> None:
    """Before accelerator.prepare under FSDP: leave the LoRA modules out of sharding; wrap per decoder layer
    (the model's own `_no_split_modules`, which accelerate's TRANSFORMER_BASED_WRAP reads from the root)."""
    plugin = accelerator.state.fsdp_plugin
    plugin.ignored_modules = _LORA_MODULES
    loss_module._no_split_modules = getattr(model, "_no_split_modules", None)


def average_adapter_grads(params, world: int) -> None:
    """All-reduce (mean) the LoRA gradients, which FSDP does not manage (they are outside its shards)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


class AdapterSaver:
    """`save_pretrained(folder)` of a PEFT model whose layers are FSDP-wrapped: PEFT selects the adapter tensors
    from the LoRA parameters alone (no `state_dict()` call through FSDP, which gathers across processes) and
    writes config and card; the wrapper names FSDP adds to the parameter paths are then removed from the file."""

    def __init__(self, model) -> None:
        self.model = model

    def save_pretrained(self, folder, **kwargs) -> None:
        from safetensors.torch import load_file, save_file

        lora = {name: param.detach() for name, param in self.model.named_parameters() if "lora_" in name}
        self.model.save_pretrained(folder, state_dict=lora, **kwargs)
        path = Path(folder) / "adapter_model.safetensors"
        save_file({_plain_name(k): v for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})


def _plain_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class DataParallel:
    """One process or DDP: the strategy object `train_lora` calls (see the module docstring)."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.loss_module = None

    def check(self, train_cfg) -> None:
        check_split(train_cfg.batch_size, self.world)

    def prepare(self, loss_module, optimizer):
        """(wrapped loss module, optimizer, the bare model on the device): the wrapper's hooks run around the loss
        module's forward."""
        self.loss_module, optimizer = self.accelerator.prepare(loss_module, optimizer)
        return self.loss_module, optimizer, self.accelerator.unwrap_model(self.loss_module).model

    def micro_batches(self, indices: list[int], batch_size: int) -> list[list[int]]:
        """This process's share of each micro-batch of the step (rows rank, rank + world, ...): any batch size >=
        world and any grad_accum give each process the same number of forward/backward passes."""
        return [indices[i : i + batch_size][self.rank :: self.world] for i in range(0, len(indices), batch_size)]

    def accumulating(self, last: bool):
        """Around a micro-batch's forward: gradients are all-reduced once per optimizer step, with the last one."""
        return nullcontext() if last else self.accelerator.no_sync(self.loss_module)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def finish_gradients(self, optimizer, scaler, max_grad_norm: float | None) -> None:
        """After the step's last backward: clip the gradient norm (fp16: of the unscaled gradients)."""
        if max_grad_norm:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            self.accelerator.clip_grad_norm_(self.loss_module.parameters(), max_grad_norm)

    def reduce(self, loss_sum: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """The step's summed loss and token count over all processes."""
        if self.world == 1:
            return loss_sum, tokens
        packed = torch.stack([loss_sum.float(), torch.tensor(float(tokens), device=loss_sum.device)])
        packed = self.accelerator.reduce(packed, reduction="sum")
        return packed[0], int(packed[1].item())

    def evaluate(self, objective, model, device) -> dict[str, float]:
        """Held-out figures of the objective; every process holds the whole model."""
        return objective.evaluate(model, device)

    def saveable(self, model):
        """What `save_checkpoint` and the final save call `save_pretrained` on."""
        return model

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


class ShardedBase(DataParallel):
    """FSDP with the base sharded and the LoRA modules whole on every process (see the module docstring)."""

    def check(self, train_cfg) -> None:
        super().check(train_cfg)
        if train_cfg.objective != "sft":
            raise UserError(
                f"train.objective: {train_cfg.objective} is not supported under FSDP yet (use DDP or one process)"
            )

    def prepare(self, loss_module, optimizer):
        shard_base_only(self.accelerator, loss_module, loss_module.model)
        loss_module, optimizer, model = super().prepare(loss_module, optimizer)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        return loss_module, optimizer, model

    def finish_gradients(self, optimizer, scaler, max_grad_norm: float | None) -> None:
        average_adapter_grads(self.trainable, self.world)
        if max_grad_norm:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm)  # the adapter is whole (and equal) everywhere

    def evaluate(self, objective, model, device) -> dict[str, float]:
        """Through the wrapped loss module: only the root's forward gathers the sharded base."""
        figures = objective.evaluate(model, device, loss_module=self.loss_module)
        self.loss_module.train()
        return figures

    def saveable(self, model):
        return AdapterSaver(model)


def distribution_for(accelerator, train_cfg) -> DataParallel:
    """The strategy for how this run was launched (accelerate decides: one process, DDP or FSDP), once it has
    checked that `train_cfg` can run that way."""
    strategy = ShardedBase(accelerator) if is_fsdp(accelerator) else DataParallel(accelerator)
    strategy.check(train_cfg)
    return strategy
