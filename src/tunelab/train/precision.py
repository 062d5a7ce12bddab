"""`train.precision: auto|fp32|bf16` — pick by what the hardware does well, and say why.

On CPUs without native bf16 (AVX2 only), bf16 matmul is emulated and ~700x slower than fp32; on CPUs with
`avx512_bf16` or AMX it is ~2.6x faster. `auto` therefore means: bf16 autocast (frozen weights stored in
bf16, LoRA weights and optimizer state in fp32) where bf16 is native, fp32 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device_type: str):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.name == "bf16")

    def skip_adapter_input_casts(self, model) -> None:
        """bf16: stop PEFT casting each LoRA layer's bf16 input to fp32 (the adapter weights' dtype).

        Under autocast that cast is undone at once (the LoRA matmul runs in bf16 anyway), but it costs a copy per
        adapted layer per step, and autograd keeps that copy: 7 extra activations per decoder layer. Call only
        for models that always run under `self.autocast` (the training loop and its evaluation do).
        """
        if self.name != "bf16":
            return
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """The CPU's marketing name, for benchmark reports (timings mean little without it)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_precision(requested: str, device_type: str = "cpu") -> Precision:
    if requested == "fp32":
        return Precision("fp32", "requested by train.precision")
    if device_type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        found = sorted(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS))
        native = bool(found)
        where = f"CPU has {', '.join(found)}" if found else "CPU lacks avx512_bf16/amx_bf16 (bf16 would be emulated)"
    if requested == "bf16":
        note = "" if native else " — warning: not native here, expect it to be much slower than fp32"
        return Precision("bf16", f"requested by train.precision{note}")
    if native:
        return Precision("bf16", f"auto: {where if device_type == 'cuda' else where} -> native bf16")
    return Precision("fp32", f"auto: {where} -> fp32")
