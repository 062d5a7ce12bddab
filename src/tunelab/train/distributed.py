"""Training on several processes (accelerate): DDP, and FSDP with the base sharded and the LoRA weights trained.

Under FSDP the frozen base weights are sharded across processes (what makes a 3B+ model fit), while the LoRA
modules are left out of FSDP (`ignored_modules`): every process holds the full, tiny adapter, so the optimizer,
checkpoints and the final save work exactly as in one process. Their gradients are averaged here, once per
optimizer step, as DDP would. Two things must not run through FSDP's own hooks:
- evaluation calls the FSDP-wrapped loss module (the root gathers the shards it needs), not the bare model;
- saving takes the adapter from the LoRA parameters alone: `state_dict()` through FSDP wrappers gathers across
  processes, and only the main process saves.
"""

from __future__ import annotations

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
        f"(batch_size {batch_size} x grad_accum {grad_accum}, each micro-batch split over {world} process{'es' * (world > 1)})"
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


@torch.no_grad()
def fsdp_heldout_loss(loss_module, rows, batch_size: int, packing: bool, pad_id: int, precision, device) -> float:
    """`heldout_loss` through the FSDP-wrapped loss module, whose forward gathers the sharded base (every process
    runs it)."""
    from tunelab.train.heldout import heldout_loss

    loss = heldout_loss(
        loss_module, rows, batch_size, packing, pad_id, precision, device,
        batch_loss=lambda batch: (loss_module(batch), batch.num_targets),
    )  # fmt: skip
    loss_module.train()
    return loss


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
