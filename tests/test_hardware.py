import os
import subprocess
import sys

from tunelab.hardware import usable_cores


def test_usable_cores_follow_the_affinity_mask_not_the_machine():
    # A child pinned to one core (as `taskset -c 0` pins a job) must see one core, whatever the machine has.
    one_core = min(os.sched_getaffinity(0))
    code = (
        "import os; from tunelab.hardware import usable_cores;"
        f"os.sched_setaffinity(0, {{{one_core}}}); print(usable_cores())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_usable_cores_are_the_cores_this_process_may_run_on():
    assert usable_cores() == len(os.sched_getaffinity(0))
