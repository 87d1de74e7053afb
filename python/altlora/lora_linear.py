"""``LoRALinear``: a linear layer with a LoRA adapter, running on the fused op.

``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with the frozen ``weight`` W (out×in) and ``bias`` b, the
trainable ``lora_A`` A (r×in) and ``lora_B`` B (out×r), and ``scaling`` s = α/r (α/√r with
rsLoRA). The forward and backward are ``altlora_kernels.lora_linear``: the backward computes the
gradient of a factor only when that factor requires grad, so an AltLoRA phase with the other
factor frozen (``freeze_inactive=True``) does half of the LoRA weight-gradient work, and a B phase
keeps the N×r product ``x·Aᵀ`` instead of the input.

``find_lora_pairs`` recognizes the layer by its ``lora_A`` / ``lora_B`` Parameters and float
``scaling``, so ``altlora.AltLoRA(model, ...)`` trains it like a PEFT layer.
"""

from __future__ import annotations

import math
import warnings
import torch
import torch.nn.functional as F
from torch import nn

from altlora_kernels.lora_linear import LORA_LINEAR_BACKENDS, lora_linear

__all__ = ["LoRALinear"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``r`` adapter ``s·B·A``.

    Args:
        in_features, out_features: sizes of the input and output features.
        r: adapter rank.
        alpha: LoRA α; ``scaling`` is α/r, or α/√r with ``rslora=True``.
        bias: whether the (frozen) base layer has a bias.
        dropout: dropout probability on the adapter's input while training, in [0, 1).
        rslora: use the rank-stabilized scaling α/√r.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        device, dtype: of the parameters.

    Initialization follows LoRA: ``weight``, ``bias`` and ``lora_A`` as ``nn.Linear``'s weight
    (Kaiming-uniform), ``lora_B`` zero, so the layer starts as its base layer.
    :meth:`from_linear` wraps an existing ``nn.Linear`` instead.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        bias: bool = True,
        dropout: float = 0.0,
        rslora: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.r = _positive_int("r", r)
        try:
            alpha = float(alpha)
            dropout = float(dropout)
        except (TypeError, ValueError):
            raise ValueError(f"alpha and dropout must be numbers, got {alpha!r} and {dropout!r}") from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend not in LORA_LINEAR_BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(LORA_LINEAR_BACKENDS)})")
        self.alpha = alpha
        self.dropout = dropout
        self.rslora = bool(rslora)
        self.backend = backend
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base weight and bias as ``nn.Linear``; the adapter as LoRA (A Kaiming-uniform, B = 0)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.merged = False  # a fresh base weight holds no merged adapter
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.merged:
            raise RuntimeError("unmerge() the adapter before re-initializing it")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    backend: str = "auto") -> "LoRALinear":
        """A ``LoRALinear`` around ``linear``: it takes over (and freezes) ``linear``'s weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, r, alpha, bias=False, dropout=dropout,
                    rslora=rslora, backend=backend, device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        layer.bias = linear.bias
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` in the weight's dtype (computed in fp32)."""
        return (self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``s·B·A`` into ``weight``; until :meth:`unmerge` the forward is the plain linear layer
        (the factors then get no gradients)."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): the adapter is already merged; nothing to do", stacklevel=2)
            return
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``s·B·A`` from ``weight`` again (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): the adapter is not merged; nothing to do", stacklevel=2)
            return
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, bias={self.bias is not None}, "
                f"dropout={self.dropout:g}, rslora={self.rslora}, backend={self.backend!r}, merged={self.merged}")
