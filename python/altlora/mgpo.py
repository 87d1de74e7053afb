"""LoRA-MGPO: momentum-guided perturbation of the forward pass (Chang et al., 2025).

SAM-like flatness without SAM's second gradient: the forward and backward pass of a step run at
perturbed weights ``W + ε``, the direction of ``ε`` taken from the optimizer's first moments
instead of from an extra gradient. For each adapted layer ``W = W0 + s·B·A``::

    D  = s·(M_B·A + B·M_A)                               first moments mapped into weight space
    ε  = −ρ · D/‖D‖_F · min(1/(ḡ + 1e-12), 10)           applied to the forward pass
    ḡ ← β·ḡ + (1−β)·‖s·(∇B·A + B·∇A)‖_F                  after the backward; the first value sets ḡ

``M_A``, ``M_B`` are the optimizer's first moments of ``A`` and ``B``: ``state[p]["momentum"]``
for :class:`~altlora.AltLoRA` / :class:`~altlora.AltLoRAPlus` (the moment of the *scaled*
gradient: only its direction matters here), ``"exp_avg"`` for ``torch.optim.AdamW`` / Adam,
``"momentum_buffer"`` for SGD. ``ḡ`` is kept per layer.

Which ∇ the EMA reads: ``∇A``, ``∇B`` are the gradients that the backward pass(es) inside the
context produced for this layer, i.e. the gradients *at the perturbed point* ``W + ε`` (the
perturbation does not depend on ``A``, ``B``, so ``∇A = s·Bᵀ·∇W|_{W+ε}``, ``∇B = s·∇W|_{W+ε}·Aᵀ``).
They are captured by gradient hooks on ``A`` and ``B`` as autograd delivers them, before they are
accumulated into ``.grad``: summed over the backward passes inside one context, and never
including what ``.grad`` held before (gradient accumulation over several contexts feeds each
micro-batch's own gradient; ``zero_grad()`` inside the context changes nothing). Under
``DistributedDataParallel`` they are the rank's local gradients, before the all-reduce, so ``ḡ``
may differ slightly between ranks. ``A`` and ``B`` are their (unchanged) values.

Rules kept from the authors' trainer: ``ḡ`` starts at the first norm observed; before any, the
factor ``min(1/(ḡ + 1e-12), 10)`` is 1; a layer gets no perturbation before a first moment exists
(no optimizer state yet), nor while ``D = 0``. A non-finite norm leaves ``ḡ`` unchanged; a
non-finite ``D`` gives no perturbation.

How it is applied, and why: the authors add ``ε`` to the base weight and subtract it after the
backward. In bf16 that drifts (``(W + ε) − ε ≠ W``) and rounds away the entries of ``ε`` below
half a unit in the last place of ``W``; it also forms a k×d tensor per layer. Here no parameter
is written at all. A forward hook on each adapted module adds ``x·εᵀ`` to its output,
computed in low rank through the LoRA path::

    x·εᵀ = c·(x·Vᵀ)·Uᵀ,   U = [M_B, B] (k×2r),   V = [A; M_A] (2r×d),   c = −ρ·s·min(·)/‖D‖_F

(a missing moment drops its block, leaving rank r). ``‖D‖_F = |s|·√⟨UᵀU, VVᵀ⟩`` and the
gradient norm come from 2r×2r Grams, so nothing k×d is ever formed. Every parameter, the base
weight included, and the optimizer state are bit-identical before and after, in any dtype, and
AltLoRA's cached Grams (which watch parameter version counters) stay valid.

Cost (``bench/mgpo_cost.py``): time, a rank-2r LoRA forward and its input-gradient backward per
layer, plus on entry and exit a fixed number of small batched ops per group of same-shaped
layers (no device sync); memory while a context is open,
``U`` and ``V`` (twice the adapter's size; autograd saves them, and no activation, for the
backward) and the captured gradients (the adapter's size: holding them makes autograd copy a
first gradient into ``.grad`` instead of moving it). Measured on a MiniLM-shaped BERT (37 LoRA
layers, r = 8, batch 16×64, one CPU thread): +13% step time in fp32, +7% in bf16 (the
add-then-subtract scheme: +8% / +11%), 4-9 ms per enter/exit (add-then-subtract: 77-96 ms),
3.9 MiB held in fp32.

Use: one context per forward + backward, ``optimizer.step()`` after it::

    mgpo = altlora.MGPO(model, optimizer, rho=0.05, beta=0.9)
    for batch in data:
        with mgpo:
            loss = model(**batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

Supported layers: PEFT ``lora.Linear`` (``fan_in_fan_out`` included: the hook works on the
output), ``lora.Embedding``, ``lora.Conv*`` (``groups == 1``), and modules that own ``lora_A`` /
``lora_B`` Parameters (altlora's ``LoRALinear``). Only active, enabled PEFT adapters are
perturbed. Not supported (ValueError): DoRA and other PEFT LoRA variants (their output is not
linear in ``W0 + s·B·A``). A PEFT mixed-adapter batch (``adapter_names=``) is perturbed on every
row. Under fp16 loss scaling the gradients, hence ``ḡ``, carry the loss scale.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CONV, EMBEDDING, LINEAR, LoRALayer, find_lora_layers
from .state import MOMENTUM

__all__ = ["MGPO", "MOMENT_KEYS", "MAX_ADAPTIVE_SCALE", "NORM_EPS"]

# Where the first moment lives in optimizer.state[p], in lookup order: altlora's optimizers,
# torch Adam/AdamW, torch SGD with momentum.
MOMENT_KEYS = (MOMENTUM, "exp_avg", "momentum_buffer")

# The method's cap on 1/ḡ: a layer whose gradients are tiny is not perturbed without bound.
MAX_ADAPTIVE_SCALE = 10.0
# The method's ε in 1/(ḡ + ε).
NORM_EPS = 1e-12

_GRAD_EMA = "grad_ema"


def _product_norms(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """‖U_i·V_i‖_F for stacked U (L, k, m), V (L, m, d), from the m×m Grams (m ≤ 2r):
    ‖UV‖² = tr(UᵀU·VVᵀ) = Σ (UᵀU ⊙ VVᵀ); nothing k×d is formed."""
    return ((U.mT @ U) * (V @ V.mT)).sum(dim=(1, 2)).clamp_min(0).sqrt()


def _stack_float(tensors: List[torch.Tensor], shape) -> torch.Tensor:
    """(L, *shape) float32 stack; one cast for the stack when the dtypes agree (they do, normally)."""
    views = [t.detach().reshape(shape) for t in tensors]
    if len({v.dtype for v in views}) > 1:
        views = [v.float() for v in views]
    return torch.stack(views).float()


@dataclass(eq=False)
class _Slot:
    """One perturbed layer: where its ḡ lives and what a context holds for it while open."""

    layer: LoRALayer
    index: int  # into MGPO._ema[device]
    hooks: List[Any] = field(default_factory=list)
    entry_versions: tuple = ()
    captured: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)  # gradients seen inside the context

    def group_key(self, has_A: bool, has_B: bool) -> tuple:
        """Layers with equal keys are computed together (stacked)."""
        A, B = self.layer.pair.matrices()
        return (tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device, has_A, has_B)


def _check_number(name: str, value, low: float, high: Optional[float]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number)")
    if value < low or (high is not None and value >= high):
        bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value} (must be {bounds})")
    return float(value)


def _check_supported(layer: LoRALayer) -> None:
    if layer.variant() is not None:
        raise ValueError(
            f"{layer.name}: MGPO does not support {layer.variant()} layers (their output is not linear in "
            f"W0 + s·B·A, so adding x·εᵀ would not perturb the effective weight by ε)"
        )
    if layer.kind not in (LINEAR, EMBEDDING, CONV):
        raise ValueError(
            f"{layer.name}: MGPO supports linear, embedding and convolution LoRA layers; "
            f"{type(layer.module).__name__} is none of them"
        )
    if layer.kind == CONV:
        lora_B = layer.module.lora_B[layer.adapter]
        if getattr(lora_B, "groups", 1) != 1:
            raise ValueError(f"{layer.name}: MGPO does not support grouped LoRA convolutions (groups = {lora_B.groups})")


def _versions(slot: _Slot) -> tuple:
    return (slot.layer.pair.A._version, slot.layer.pair.B._version)


def _make_grad_hook(captured: Dict[str, Optional[torch.Tensor]], factor: str):
    def grad_hook(grad: torch.Tensor) -> None:
        # Read only (returns None): the gradient autograd delivers for this backward pass.
        previous = captured[factor]
        captured[factor] = grad.detach() if previous is None else previous + grad.detach()

    return grad_hook


def _make_hook(layer: LoRALayer, U: torch.Tensor, V: torch.Tensor):
    module, kind = layer.module, layer.kind
    if kind == CONV:
        conv_A, conv_B = module.lora_A[layer.adapter], module.lora_B[layer.adapter]
        V_conv = V.reshape((V.shape[0],) + tuple(layer.pair.A.shape[1:]))
        U_conv = U.reshape((U.shape[0], U.shape[1]) + tuple(layer.pair.B.shape[2:]))

    def hook(mod, args, kwargs, output):
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise RuntimeError(f"MGPO: {layer.name} was called without a tensor input/output; cannot perturb it")
        if kind == EMBEDDING:
            extra = F.linear(F.embedding(x, V.mT), U)
            embed_scale = module._get_embed_scale() if hasattr(module, "_get_embed_scale") else None
            if embed_scale is not None:
                extra = extra * embed_scale.to(extra.dtype)
        elif kind == CONV:
            extra = conv_B._conv_forward(conv_A._conv_forward(x.to(V.dtype), V_conv, None), U_conv, None)
        else:
            extra = F.linear(F.linear(x.to(V.dtype), V), U)
        return output + extra.to(output.dtype)

    return hook


class MGPO:
    """Momentum-guided perturbation of the forward pass of a LoRA model (see the module docstring).

    Args:
        model: the model whose LoRA layers the optimizer trains.
        optimizer: ``altlora.AltLoRA``, ``altlora.AltLoRAPlus``, ``torch.optim.AdamW`` (or any
            optimizer keeping ``"momentum"``, ``"exp_avg"`` or ``"momentum_buffer"`` per parameter)
            holding the LoRA factors.
        rho: ρ ≥ 0, the perturbation radius (per layer, in Frobenius norm, before the adaptive
            factor). Default 0.05, the authors' default.
        beta: β ∈ [0, 1), the EMA coefficient of the gradient norm. Default 0.9.

    ``grad_ema`` (per layer name) and ``state_dict()`` / ``load_state_dict()`` expose ``ḡ``.
    Entry and exit work on same-shaped layers together (a fixed number of ops per group of
    shapes, not per layer) and never synchronize with the device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rho: float = 0.05, beta: float = 0.9):
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.rho = _check_number("rho", rho, 0.0, None)
        self.beta = _check_number("beta", beta, 0.0, 1.0)
        self.model = model
        self.optimizer = optimizer
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        layers = [layer for layer in find_lora_layers(model) if id(layer.pair.A) in trained or id(layer.pair.B) in trained]
        if not layers:
            raise ValueError(
                f"Invalid model: no LoRA layer of {type(model).__name__} has a factor in the optimizer's param "
                f"groups; MGPO perturbs the layers the optimizer trains"
            )
        for layer in layers:
            _check_supported(layer)
        counts: Dict[torch.device, int] = {}
        self._slots: List[_Slot] = []
        for layer in layers:
            device = layer.pair.A.device
            self._slots.append(_Slot(layer, counts.get(device, 0)))
            counts[device] = counts.get(device, 0) + 1
        # ḡ of every layer, one float32 vector per device; NaN until a layer's first gradient norm.
        self._ema: Dict[torch.device, torch.Tensor] = {
            device: torch.full((n,), float("nan"), dtype=torch.float32, device=device) for device, n in counts.items()
        }
        # (scalings, indices) device tensors per group of slots, built once.
        self._group_tensors: Dict[tuple, tuple] = {}
        self._inside = False

    # ------------------------------------------------------------------ validation
    def _moment(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        state = self.optimizer.state.get(p)
        if not state:
            return None
        for key in MOMENT_KEYS:
            moment = state.get(key)
            if isinstance(moment, torch.Tensor):
                return moment
        if any(key in state for key in MOMENT_KEYS):
            return None  # e.g. SGD without momentum keeps momentum_buffer = None
        raise ValueError(
            f"optimizer state of a LoRA factor of shape {tuple(p.shape)} has none of {', '.join(MOMENT_KEYS)} "
            f"(keys: {', '.join(map(str, state))}); MGPO needs the optimizer's first moment"
        )

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "MGPO":
        if self._inside:
            raise RuntimeError("MGPO context entered twice; close it (after the backward) before entering again")
        self._inside = True
        try:
            self._open()
        except BaseException:
            self._close_all()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        changed = [slot.layer.name for slot in self._slots if slot.entry_versions and slot.entry_versions != _versions(slot)]
        try:
            if exc_type is None and not changed:
                self._update_ema()
        finally:
            self._close_all()
        if exc_type is None and changed:
            raise RuntimeError(
                f"LoRA factors of {changed[0]} changed inside the MGPO context (optimizer.step() inside it?); "
                f"the context must hold only the forward and backward: call step() after the with-block. "
                f"The gradient-norm EMA was not updated."
            )
        return False

    def _close_all(self) -> None:
        for slot in self._slots:
            for handle in slot.hooks:
                handle.remove()
            slot.hooks = []
            slot.entry_versions = ()
            slot.captured = {}
        self._inside = False

    def _group_tensors_of(self, slots: List[_Slot]) -> tuple:
        key = tuple(slot.index for slot in slots) + (slots[0].layer.pair.A.device,)
        if key not in self._group_tensors:
            device = slots[0].layer.pair.A.device
            self._group_tensors[key] = (
                torch.tensor([slot.layer.pair.scaling for slot in slots], dtype=torch.float32, device=device),
                torch.tensor([slot.index for slot in slots], dtype=torch.long, device=device),
            )
        return self._group_tensors[key]

    @torch.no_grad()
    def _open(self) -> None:
        groups: Dict[tuple, list] = {}
        for slot in self._slots:
            layer = slot.layer
            if not layer.is_active():
                continue
            pair = layer.pair
            slot.entry_versions = _versions(slot)
            slot.captured = {"A": None, "B": None}
            for factor, p in (("A", pair.A), ("B", pair.B)):
                if p.requires_grad:
                    slot.hooks.append(p.register_hook(_make_grad_hook(slot.captured, factor)))
            M_A, M_B = self._moment(pair.A), self._moment(pair.B)
            if (M_A is None and M_B is None) or self.rho == 0.0:
                continue  # no perturbation before a first moment exists
            key = slot.group_key(M_A is not None, M_B is not None)
            groups.setdefault(key, []).append((slot, M_A, M_B))
        for members in groups.values():
            U, V = self._perturbation_factors([m[0] for m in members], [m[1] for m in members], [m[2] for m in members])
            for i, (slot, _, _) in enumerate(members):
                hook = _make_hook(slot.layer, U[i], V[i])
                slot.hooks.append(slot.layer.module.register_forward_hook(hook, with_kwargs=True))

    def _perturbation_factors(self, slots: List[_Slot], moments_A: list, moments_B: list):
        """Stacked ``(U, V)`` with ``ε_i = U_i·V_i`` (the coefficient folded into U), in the factors' dtype."""
        pair0 = slots[0].layer.pair
        A_shape, B_shape = tuple(pair0.matrices()[0].shape), tuple(pair0.matrices()[1].shape)
        A = _stack_float([slot.layer.pair.A for slot in slots], A_shape)
        B = _stack_float([slot.layer.pair.B for slot in slots], B_shape)
        left, right = [], []
        if moments_B[0] is not None:
            left.append(_stack_float(moments_B, B_shape))
            right.append(A)
        if moments_A[0] is not None:
            left.append(B)
            right.append(_stack_float(moments_A, A_shape))
        U, V = torch.cat(left, dim=2), torch.cat(right, dim=1)
        scalings, indices = self._group_tensors_of(slots)
        d_norm = scalings.abs() * _product_norms(U, V)
        ema = self._ema[A.device][indices]
        adaptive = torch.where(torch.isnan(ema), 1.0, torch.clamp(1.0 / (ema + NORM_EPS), max=MAX_ADAPTIVE_SCALE))
        coef = -self.rho * scalings * adaptive / d_norm
        # A layer with D = 0 or a non-finite D gets ε = 0; torch.where, not an `if`: no device sync.
        valid = (torch.isfinite(d_norm) & (d_norm > 0) & torch.isfinite(coef))[:, None, None]
        zero = torch.zeros((), device=A.device)
        U = torch.where(valid, U * coef[:, None, None], zero)
        V = torch.where(valid, V, zero)
        dtype = pair0.A.dtype
        return U.to(dtype), V.to(dtype)

    @torch.no_grad()
    def _update_ema(self) -> None:
        groups: Dict[tuple, List[_Slot]] = {}
        for slot in self._slots:
            if not slot.entry_versions:
                continue
            grad_A, grad_B = slot.captured.get("A"), slot.captured.get("B")
            if grad_A is None and grad_B is None:
                continue  # no backward reached this layer inside the context
            groups.setdefault(slot.group_key(grad_A is not None, grad_B is not None), []).append(slot)
        for slots in groups.values():
            pair0 = slots[0].layer.pair
            A_shape, B_shape = tuple(pair0.matrices()[0].shape), tuple(pair0.matrices()[1].shape)
            A = _stack_float([slot.layer.pair.A for slot in slots], A_shape)
            B = _stack_float([slot.layer.pair.B for slot in slots], B_shape)
            left, right = [], []
            if slots[0].captured["B"] is not None:
                left.append(_stack_float([slot.captured["B"] for slot in slots], B_shape))
                right.append(A)
            if slots[0].captured["A"] is not None:
                left.append(B)
                right.append(_stack_float([slot.captured["A"] for slot in slots], A_shape))
            scalings, indices = self._group_tensors_of(slots)
            norm = scalings.abs() * _product_norms(torch.cat(left, dim=2), torch.cat(right, dim=1))
            ema = self._ema[A.device]
            old = ema[indices]
            updated = torch.where(torch.isnan(old), norm, self.beta * old + (1.0 - self.beta) * norm)
            # A non-finite norm (an overflowed backward) leaves ḡ as it was.
            ema[indices] = torch.where(torch.isfinite(norm), updated, old)

    # ------------------------------------------------------------------ inspection and checkpoints
    @property
    def layer_names(self) -> List[str]:
        return [slot.layer.name for slot in self._slots]

    def _ema_values(self) -> Dict[str, Optional[float]]:
        host = {device: ema.tolist() for device, ema in self._ema.items()}
        out = {}
        for slot in self._slots:
            value = host[slot.layer.pair.A.device][slot.index]
            out[slot.layer.name] = None if math.isnan(value) else value
        return out

    @property
    def grad_ema(self) -> Dict[str, Optional[float]]:
        """ḡ per layer name (``None`` before its first gradient). Reading it syncs the device."""
        return self._ema_values()

    def state_dict(self) -> Dict[str, Any]:
        return {"rho": self.rho, "beta": self.beta, _GRAD_EMA: self._ema_values()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore ``ḡ`` (and ρ, β) saved by :meth:`state_dict` for the same layers."""
        if not isinstance(state_dict, dict) or _GRAD_EMA not in state_dict:
            raise ValueError("Invalid state_dict: expected the dict of MGPO.state_dict()")
        saved = state_dict[_GRAD_EMA]
        names = set(self.layer_names)
        if not isinstance(saved, dict) or set(saved) != names:
            saved_names = set(saved) if isinstance(saved, dict) else set()
            missing, extra = sorted(names - saved_names), sorted(saved_names - names)
            raise ValueError(
                f"Invalid state_dict: its layers do not match this model's (missing: {missing[:3]}, unknown: {extra[:3]})"
            )
        rho = _check_number("rho", state_dict.get("rho", self.rho), 0.0, None)
        beta = _check_number("beta", state_dict.get("beta", self.beta), 0.0, 1.0)
        values = {device: ema.clone().cpu() for device, ema in self._ema.items()}
        for slot in self._slots:
            value = saved[slot.layer.name]
            if value is None:
                value = float("nan")
            elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Invalid state_dict: grad_ema of {slot.layer.name} is {value!r}, expected a number >= 0 or None")
            values[slot.layer.pair.A.device][slot.index] = float(value)
        for device, ema in self._ema.items():
            ema.copy_(values[device])
        self.rho, self.beta = rho, beta
