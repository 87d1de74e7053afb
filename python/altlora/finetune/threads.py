"""How many torch CPU threads a fine-tuning run uses.

torch's intra-op pool (OpenMP) makes every thread wait for the slowest at the end of each parallel
region, and a training step runs hundreds of them. When the cores are shared with other busy
processes, a thread that the OS has descheduled stalls all the others: measured on the 2-core
machine with two other processes busy (load average 4.5), ``altlora finetune`` took 8.8 s per
AltLoRA+ step and 4.9 s per AdamW step with 2 threads, and 1.6 s with 1 thread.

So, unless ``--threads`` says otherwise, each run takes as many threads as there are idle cores
(CPU count minus the 1-minute load average, rounded), at least 1 and at most torch's own default.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

__all__ = ["choose_threads"]

_TORCH_DEFAULT = torch.get_num_threads()  # torch's choice (physical cores), read before anyone changes it


def choose_threads(requested: Optional[int]) -> Tuple[int, str]:
    """(threads, why): ``requested`` if given, else the idle cores as above."""
    if requested:
        return requested, "--threads"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform: torch's default
        return _TORCH_DEFAULT, "torch's default"
    cpus = os.cpu_count() or _TORCH_DEFAULT
    idle = int(round(cpus - load))
    threads = max(1, min(_TORCH_DEFAULT, idle))
    if threads < _TORCH_DEFAULT:
        return threads, f"machine busy: load {load:.1f} on {cpus} CPUs; --threads overrides"
    return threads, "idle cores"
