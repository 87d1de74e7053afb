"""CUDA-graph capture: whether one is in progress, and the clear error for work that cannot be captured.

An optimizer step of altlora is not capturable, whatever the backend:

* ``nonfinite="raise"`` reads the non-finite flag on the host (``found_inf.item()``), a sync that
  a capture refuses;
* the Triton backend builds its work tables on the host and copies them to the device from pinned
  memory whenever a factor's or a gradient's storage changes (``triton_phase_tables.py``); a
  replayed graph would read the tables of the captured step, whatever storage the gradients of
  later steps are in;
* the schedule's position (which factor the next step updates, when a run of ``switch_every``
  steps starts) is Python state: a replay would repeat the captured phase forever.

So instead of failing somewhere inside (a CUDA error about an operation not permitted while
capturing, or worse, a graph that captures and replays the wrong thing), the step refuses to run
under capture, before it touches anything. Capture the forward and backward and call ``step()``
outside the graph.
"""

from __future__ import annotations

import torch

__all__ = ["capturing", "refuse_capture", "STEP_NOT_CAPTURABLE"]

STEP_NOT_CAPTURABLE = (
    "it reads the non-finite flag on the host (nonfinite='raise'), the Triton backend copies its work "
    "tables host→device whenever a factor's or gradient's storage changes, and the schedule's position "
    "is Python state, so a replayed graph would repeat the captured phase with the captured tables. "
    "Capture the forward and backward only and call step() outside the graph"
)


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph."""
    # No capture can be in progress before CUDA is initialized, and on a CPU-only build of torch
    # is_current_stream_capturing raises instead of answering: ask only once CUDA is up.
    return bool(torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def refuse_capture(what: str, why: str = STEP_NOT_CAPTURABLE) -> None:
    """Raise ``RuntimeError`` naming ``what`` and ``why`` if a CUDA graph is being captured."""
    if capturing():
        raise RuntimeError(f"{what} cannot run while a CUDA graph is being captured: {why}.")
