"""`tunelab train` under accelerate's FSDP on CPU processes (gloo), for tests/train/test_distributed.py.

accelerate (1.15) selects FSDP only when GPUs (or other accelerators) exist: on a CPU-only machine
`accelerate launch --config_file configs/accelerate/fsdp.yaml` starts the processes with the FSDP settings in
their environment (ACCELERATE_USE_FSDP, FSDP_*), but `AcceleratorState` falls back to MULTI_CPU (DDP). This
worker restores what a GPU machine gets — the FSDP plugin built from that environment, distributed type FSDP —
and then runs the real CLI, so `accelerator.prepare` wraps tunelab's loss module with torch's FSDP exactly as it
would on GPUs (device_id = the CPU, named `cpu` rather than accelerate's `cpu:0`, which torch's FSDP refuses).

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/train/fsdp_cpu_worker.py train CONFIG
"""

from __future__ import annotations

import accelerate
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.state.distributed_type == DistributedType.MULTI_CPU:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* settings
        # MULTI_CPU names its device `cpu:0`; torch's FSDP compares `device_id` with the CPU's current device,
        # `cpu`, and refuses the difference. Same memory, plain name. Every AcceleratorState() re-reads these two
        # from PartialState, so both get them.
        for shared in (PartialState._shared_state, self.state._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")


_prepare = accelerate.Accelerator.prepare


def _prepare_and_report_shards(self, *args, **kwargs):
    """Print how much of the base each process holds, so the test can see that it really was sharded."""
    result = _prepare(self, *args, **kwargs)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [m for m in FSDP.fsdp_modules(result[0]) if m._has_params]
    if units:
        local = sum(m._flat_param._sharded_size.numel() for m in units)
        full = sum(m._flat_param._unpadded_unsharded_size.numel() for m in units)
        print(f"fsdp-shards: rank {self.process_index} units {len(units)} local {local} full {full}", flush=True)
    return result


accelerate.Accelerator.__init__ = _init_with_fsdp_on_cpu
accelerate.Accelerator.prepare = _prepare_and_report_shards

if __name__ == "__main__":
    from tunelab.cli import main

    main()
