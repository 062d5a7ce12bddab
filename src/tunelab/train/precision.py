"""`train.precision: auto|fp32|bf16|fp16` — pick by what the hardware does well, and say why.

CPU: without native bf16 (AVX2 only) bf16 matmul is emulated and ~700x slower than fp32; with `avx512_bf16`
or AMX it is ~2.6x faster. CUDA: bf16 is native from compute capability 8.0 (Ampere); older GPUs (T4 = 7.5)
get fp16 with dynamic loss scaling, since fp16's narrow range underflows small gradients without it.
`auto` means: the fastest native half precision (frozen weights stored in it, autocast; LoRA weights and
optimizer state in fp32), fp32 where there is none.

`choose_precision` is a pure function of (requested, CPU flags, CUDA capability) so the whole decision
table is unit-tested; `precision_for_this_machine` feeds it the probed hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.hardware import cpu_flags, cuda_capability, cuda_device_name

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")
CUDA_BF16_CAPABILITY = (8, 0)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16's range is narrow: small gradients underflow to 0 unless the loss is scaled up first."""
        return self.name == "fp16"

    def autocast(self, device_type: str):
        return torch.autocast(device_type=device_type, dtype=self.dtype, enabled=self.name != "fp32")

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16; a pass-through (scale/unscale/step do nothing extra) otherwise."""
        return torch.amp.GradScaler(device_type, enabled=self.needs_loss_scaling)


def choose_precision(
    requested: str,
    cpu_flags: frozenset[str] | set[str],
    cuda_capability: tuple[int, int] | None,
    device_name: str | None = None,
) -> Precision:
    """The precision to train in. `cuda_capability` None means the CPU (its `cpu_flags` decide)."""
    if requested == "fp32":
        return Precision("fp32", "requested by train.precision")
    if cuda_capability is not None:
        gpu = f"GPU {device_name or 'cuda'} (compute capability {cuda_capability[0]}.{cuda_capability[1]})"
        bf16_native = tuple(cuda_capability) >= CUDA_BF16_CAPABILITY
        if requested == "bf16":
            note = (
                ""
                if bf16_native
                else f" — warning: {gpu} has no native bf16 (needs >= 8.0); fp16 is the fast choice here"
            )
            return Precision("bf16", f"requested by train.precision{note}")
        if requested == "fp16":
            return Precision("fp16", "requested by train.precision; dynamic loss scaling on")
        if bf16_native:
            return Precision("bf16", f"auto: {gpu} has native bf16")
        return Precision("fp16", f"auto: {gpu} lacks native bf16 (needs >= 8.0) -> fp16 with dynamic loss scaling")
    bf16_found = sorted(set(cpu_flags) & set(NATIVE_BF16_CPU_FLAGS))
    if requested == "bf16":
        note = (
            ""
            if bf16_found
            else " — warning: this CPU lacks avx512_bf16/amx_bf16, expect it to be much slower than fp32"
        )
        return Precision("bf16", f"requested by train.precision{note}")
    if requested == "fp16":
        fp16_found = sorted(set(cpu_flags) & set(NATIVE_FP16_CPU_FLAGS))
        note = (
            ""
            if fp16_found
            else " — warning: this CPU lacks avx512_fp16/amx_fp16, expect it to be much slower than fp32"
        )
        return Precision("fp16", f"requested by train.precision; dynamic loss scaling on{note}")
    if bf16_found:
        return Precision("bf16", f"auto: CPU has {', '.join(bf16_found)} -> native bf16")
    return Precision("fp32", "auto: CPU lacks avx512_bf16/amx_bf16 (bf16 would be emulated) -> fp32")


def precision_for_this_machine(requested: str, device_type: str = "cpu") -> Precision:
    """`choose_precision` for the hardware the run is on (`device_type` "cuda" or "cpu")."""
    if device_type == "cuda":
        return choose_precision(requested, cpu_flags(), cuda_capability(), cuda_device_name())
    return choose_precision(requested, cpu_flags(), None)
