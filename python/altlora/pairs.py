"""LoRA factor pairs and their discovery in a model.

A :class:`LoRAPair` is one adapted layer, ``W = W0 + s·B·A``: ``A`` is ``(r, d)`` and ``B`` is
``(k, r)``. Convolution LoRA factors (``(r, c_in, kh, kw)`` and ``(c_out, r, 1, 1)``) are
accepted too and read as the matrices ``(r, c_in·kh·kw)`` and ``(c_out, r)``.

:func:`find_lora_pairs` walks a model's modules (not its parameter order) and returns one pair per
(layer, adapter) for

* PEFT ``LoraLayer``s (``lora.Linear``, ``lora.Conv*``, quantized variants): ``lora_A[name]`` and
  ``lora_B[name]`` sub-modules and ``scaling[name]`` (α/r, or α/√r with rsLoRA);
* PEFT ``lora.Embedding``: ``lora_embedding_A[name]`` ``(r, num_embeddings)`` and
  ``lora_embedding_B[name]`` ``(dim, r)``;
* modules that hold ``lora_A`` / ``lora_B`` Parameters and a float ``scaling`` themselves
  (altlora's own ``LoRALinear``).

PEFT is not imported; layers are recognized by these attributes, so any PEFT version that keeps
them works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
from torch import nn

__all__ = ["LoRAPair", "find_lora_pairs"]


@dataclass(eq=False)
class LoRAPair:
    """One adapted layer: ``A`` ``(r, d)``, ``B`` ``(k, r)``, scaling ``s`` and a display name.

    The scaling is read once, here; it enters the optimizer as the ``1/s²`` of the scaled gradient.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    name: str = ""

    def __post_init__(self) -> None:
        label = self.name or "LoRAPair"
        for factor, t in (("A", self.A), ("B", self.B)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{label}: {factor} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"{label}: {factor} must have at least 2 dimensions, got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"{label}: {factor} must be floating point, got {t.dtype}")
        if any(s != 1 for s in self.B.shape[2:]):
            raise ValueError(f"{label}: B must be (k, r) or (k, r, 1, ...), got shape {tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"{label}: rank mismatch, A has shape {tuple(self.A.shape)} (r = {self.A.shape[0]}) "
                f"but B has shape {tuple(self.B.shape)} (r = {self.B.shape[1]})"
            )
        if self.A.device != self.B.device:
            raise ValueError(f"{label}: A is on {self.A.device} but B is on {self.B.device}; a pair must share a device")
        if self.A is self.B:
            raise ValueError(f"{label}: A and B are the same tensor")
        try:
            scaling = float(self.scaling)
        except (TypeError, ValueError):
            raise ValueError(f"{label}: scaling must be a number, got {self.scaling!r}") from None
        if not math.isfinite(scaling) or scaling == 0.0:
            raise ValueError(f"{label}: scaling must be finite and non-zero, got {scaling}")
        self.scaling = scaling

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        """d: the number of columns of A read as a matrix."""
        return self.A[0].numel()

    @property
    def out_features(self) -> int:
        """k: the number of rows of B."""
        return self.B.shape[0]

    def matrices(self) -> tuple:
        """``(A, B)`` as 2-D views ``(r, d)`` and ``(k, r)`` sharing storage with the parameters."""
        # NOTE: not reshape: the optimizer updates these matrices in place, and a reshape that had to
        # copy (a channels-last conv A, whose (c, kh, kw) columns are not one stride apart) would
        # drop every update silently. Such a layout gets a clear error instead.
        try:
            return self.A.view(self.rank, -1), self.B.view(self.B.shape[0], self.rank)
        except RuntimeError:
            raise ValueError(
                f"{self.name or 'LoRAPair'}: the optimizer updates the factors in place through (r, d) and "
                f"(k, r) views, and A {tuple(self.A.shape)} with strides {self.A.stride()} / B "
                f"{tuple(self.B.shape)} with strides {self.B.stride()} cannot be viewed so (a channels-last "
                f"conv LoRA?); give the LoRA factors the default memory format, e.g. "
                f"`param.data = param.data.contiguous()`, before creating the optimizer"
            ) from None

    def factor_name(self, factor: str) -> str:
        return f"{self.name or 'pair'}.lora_{factor}"


def find_lora_pairs(model: nn.Module) -> List[LoRAPair]:
    """Every LoRA (layer, adapter) pair in ``model``, in module order.

    Names are ``"<module path>[<adapter>]"`` for PEFT layers and ``"<module path>"`` for modules
    that own their factors. Pairs are returned whatever their ``requires_grad``; the optimizers
    keep the trainable ones.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"find_lora_pairs expects an nn.Module, got {type(model).__name__}")
    pairs: List[LoRAPair] = []
    for path, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        lora_A = getattr(module, "lora_A", None)
        lora_B = getattr(module, "lora_B", None)
        if isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict) and isinstance(scaling, dict):
            for adapter, a_module in lora_A.items():
                if adapter not in lora_B or adapter not in scaling:
                    continue
                A = getattr(a_module, "weight", None)
                B = getattr(lora_B[adapter], "weight", None)
                if isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor):
                    pairs.append(LoRAPair(A, B, scaling[adapter], f"{path}[{adapter}]"))
        elif isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor) and isinstance(scaling, (int, float)):
            pairs.append(LoRAPair(lora_A, lora_B, scaling, path))
        emb_A = getattr(module, "lora_embedding_A", None)
        emb_B = getattr(module, "lora_embedding_B", None)
        if isinstance(emb_A, nn.ParameterDict) and isinstance(emb_B, nn.ParameterDict) and isinstance(scaling, dict):
            for adapter, A in emb_A.items():
                if adapter in emb_B and adapter in scaling:
                    pairs.append(LoRAPair(A, emb_B[adapter], scaling[adapter], f"{path}[{adapter}]"))
    return pairs
