"""pytest-benchmark cases, CPU-sized (seconds each): ``pytest bench --benchmark-only``.

The optimizer step over the LoRA factors of 64 layers of 384×384 (MiniLM width), r = 8, with every
available altlora backend and torch's AdamW (foreach, fused) on the same parameters.
"""

import pytest
import torch

import altlora
import altlora_kernels as K

LAYERS, WIDTH, RANK = 64, 384, 8


def _pairs():
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(LAYERS):
        A = torch.nn.Parameter(torch.randn(RANK, WIDTH, generator=gen) / WIDTH**0.5)
        B = torch.nn.Parameter(torch.randn(WIDTH, RANK, generator=gen) * 0.01)
        A.grad = torch.randn(RANK, WIDTH, generator=gen) * 1e-3
        B.grad = torch.randn(WIDTH, RANK, generator=gen) * 1e-3
        pairs.append(altlora.LoRAPair(A, B, 2.0, f"layer{i}"))
    return pairs


BACKENDS = [b for b in K.BACKENDS[1:] if K.unavailable_reason(b, torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["AltLoRA", "AltLoRAPlus"])
def test_altlora_step(benchmark, variant, backend):
    opt = getattr(altlora, variant)(_pairs(), lr=1e-3, backend=backend)
    opt.step()  # state initialization outside the timing
    benchmark(opt.step)


@pytest.mark.parametrize("mode", ["foreach", "fused"])
def test_adamw_step(benchmark, mode):
    params = [t for p in _pairs() for t in (p.A, p.B)]
    opt = torch.optim.AdamW(params, lr=1e-3, **{mode: True})
    opt.step()
    benchmark(opt.step)
