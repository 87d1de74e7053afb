"""Shared benchmark helpers: timing, environment description, tables.

Every benchmark module ``bench/<name>.py`` exposes ``run(device: str, quick: bool) -> list[dict]``
(one dict per measurement) and prints its own table when run as a script. Rows use these keys
where they apply: ``benchmark``, ``case``, ``impl``, ``median_ms``, ``min_ms``, ``bytes``,
``floor_ms`` (bytes or FLOPs over the device peak), ``floor_fraction`` (floor_ms / median_ms),
``ratio`` (vs the row named in ``ratio_to``), ``peak_mib``, ``state_bytes``.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

__all__ = ["time_fn", "environment", "print_table", "PEAK", "device_peak"]

# Peak memory bandwidth (bytes/s) and dense fp32/bf16 tensor throughput (FLOP/s) used for floors.
# Datasheet values; the CPU figure is a measured STREAM-like copy rate, set by measure_cpu_bandwidth().
PEAK = {
    "NVIDIA H100 80GB HBM3": {"bandwidth": 3.35e12, "bf16_flops": 989e12, "fp32_flops": 67e12},
    "NVIDIA H200": {"bandwidth": 4.8e12, "bf16_flops": 989e12, "fp32_flops": 67e12},
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 3, repeats: int = 20,
            setup: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """Median and min wall time of ``fn()`` in ms (``setup()`` runs untimed before each call)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


_CPU_BANDWIDTH = None


def measure_cpu_bandwidth() -> float:
    """Bytes/s of a large fp32 copy (read + write) on this CPU: the floor's denominator on CPU."""
    global _CPU_BANDWIDTH
    if _CPU_BANDWIDTH is None:
        src = torch.empty(64 * 2**20 // 4)
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), "cpu", warmup=2, repeats=10)["min_ms"]
        _CPU_BANDWIDTH = 2 * src.numel() * 4 / (t / 1e3)
    return _CPU_BANDWIDTH


def device_peak(device: str) -> Dict[str, float]:
    """Peak bandwidth/FLOPs for floors; empty dict when unknown."""
    if device.startswith("cuda"):
        return PEAK.get(torch.cuda.get_device_name(), {})
    return {"bandwidth": measure_cpu_bandwidth()}


def environment(device: str) -> Dict[str, str]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def _fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.2e}"
    return str(value)


def print_table(rows: Sequence[Dict], columns: Optional[Iterable[str]] = None, title: str = "") -> str:
    """Plain-text table of ``rows`` (columns: the given ones, else every key in first-seen order)."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    columns = list(columns)
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if v[:1].isdigit() or v[:1] == "-" else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
