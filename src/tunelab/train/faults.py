"""TEST-ONLY fault injection (tests/reliability): kill or fail the training process at a named point.

A no-op unless the env var TUNELAB_FAULT is set. `TUNELAB_FAULT=POINT:STEP[:ACTION][,...]`, e.g.
`checkpoint_files:4` SIGKILLs this process inside the write of checkpoint 4 after some of its files exist;
ACTION `enospc` / `eacces` / `erofs` raises that OSError instead (a full disk or a permission error at
exactly that point). Points: `step`, `metrics`, `eval` (loop.py), `checkpoint_files`, `checkpoint_manifest`,
`checkpoint_renamed` (checkpoint.py), `final_save` (recipe.py).
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "TUNELAB_FAULT"
_FAULT_ERRNOS = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "erofs": errno.EROFS}


def maybe_inject_fault(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, rest = item.strip().partition(":")
        at, _, action = rest.partition(":")
        if name != point or not at.isdigit() or int(at) != step:
            continue
        if action in ("", "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        code = _FAULT_ERRNOS[action]
        raise OSError(code, os.strerror(code), f"<{FAULT_ENV} {item.strip()}>")
