"""One AltLoRA / AltLoRA+ phase over groups of same-shaped layers (the ``torch`` backend).

Row form. Both phases are the same computation once each factor is seen as an ``r × n`` matrix
``X`` ("row form"): ``A`` itself (n = d) or ``Bᵀ`` (n = k). With ``Y`` the other factor in row form,
the phase that updates ``X`` is (``docs/math.md`` states it per factor; this is the same in row form):

    P   = (Y Yᵀ + λI)⁻¹                  Cholesky of the cached Gram of Y, damping escalated
    g̃   = (1/s²) · P · ∇X                 the scaled gradient (Theorem 1)
    M̃   = P · C_Y · M                      C_Y = Y_cur · Y_prevᵀ, Y_prev = Y at X's last phase
    M   = β1·M̃ + (1−β1)·g̃                (Theorem 2)
    AltLoRA : X ← X − η·(M + γX)
    AltLoRA+: V = β2·V + (1−β2)·g̃⊙g̃ ; n += 1
              X ← X − η·((M/(1−β1ⁿ)) / (sqrt(V/(1−β2ⁿ)) + ε) + γX)

For a B phase (X = Bᵀ) this is exactly ``g̃ = (1/s²)∇B·P`` and ``M̃ = M_B·C·P`` with
``C = A_prev·Aᵀ``; for an A phase it is ``g̃ = (1/s²)P·∇A`` and ``M̃ = P·C·M_A`` with
``C = Bᵀ·B_prev``.

Bookkeeping done in the same pass, so that no copy of a factor is ever kept:
  * ``gram  ← X_new X_newᵀ``                  (the next phase of Y needs it)
  * ``cross ← X_new X_refᵀ``                  X_ref = X_old, or the run's snapshot when the
                                              schedule updates X several times in a row
  * ``other_cross ← other_gram``              Y's momentum alignment is now at Y's current value

Grams are taken of the values actually stored (after rounding to the parameter dtype), so a
resumed run that recomputes them from the parameters gets the same numbers.

``found_inf`` (a 0-dim tensor, non-zero when a gradient is not finite) turns the whole phase
into a no-op on the device, without a host sync: every output keeps its old value. (A flag on
the CPU is read on the host, which costs nothing there.)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .cholesky import damped_cholesky
from .phase_types import FactorGroup, PhaseHyperParams

__all__ = ["SUPPORTED_DTYPES", "phase_update_torch", "phase_update", "unavailable_reason"]

# Every floating dtype: the math runs in (at least) float32 with torch ops.
SUPPORTED_DTYPES = None


# The ops below take stacked factors in their stored layout, (L, r, d) for A and (L, k, r) for B,
# and compute the row-form products without materializing transposes.


def _left(m: torch.Tensor, x: torch.Tensor, transposed: bool, out=None) -> torch.Tensor:
    """m · X_row for r×r ``m``, returned in X's stored layout."""
    return torch.bmm(x, m.mT, out=out) if transposed else torch.bmm(m, x, out=out)


def _left_add(base: torch.Tensor, m: torch.Tensor, x: torch.Tensor, transposed: bool, out=None) -> torch.Tensor:
    """base + m · X_row, in the stored layout."""
    if transposed:
        return torch.baddbmm(base, x, m.mT, out=out)
    return torch.baddbmm(base, m, x, out=out)


def _row_products(x: torch.Tensor, y: torch.Tensor, transposed: bool, out=None) -> torch.Tensor:
    """X_row · Y_rowᵀ (r×r) from stored layouts: X·Yᵀ for A, Xᵀ·Y for B."""
    return torch.bmm(x.mT, y, out=out) if transposed else torch.bmm(x, y.mT, out=out)


def phase_update_torch(
    groups: Sequence[FactorGroup],
    hp: PhaseHyperParams,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """Run one phase for every group: the r×r work of all groups of one rank, dtype and device in
    one batch, then a fixed number of batched ops per group."""
    if found_inf is not None and found_inf.device.type == "cpu":
        # Reading a CPU flag costs no device sync: a skipped phase does nothing at all, and a
        # taken one runs the direct path (every buffer written in place, no torch.where copies).
        if bool(found_inf.item()):
            return
        found_inf = None
    for g, per_layer in zip(groups, _per_layer_factors(groups, hp)):
        _phase_update_group(g, hp, found_inf, *per_layer)


def _per_layer_factors(groups: Sequence[FactorGroup], hp: PhaseHyperParams) -> List[tuple]:
    """Per group, ``(P/s², P·C_Y, new step counts, AltLoRA+ bias factors or None)`` (see the
    module docstring; for AltLoRA the first two times 1−β1 and β1), the groups of one rank, dtype and device batched together: a dozen ops on
    r×r matrices and a few on per-layer scalars per batch instead of per group (each op costs
    several µs whatever its size; mixed layer shapes make several groups per phase)."""
    batches: Dict[tuple, List[int]] = {}
    for i, g in enumerate(groups):
        batches.setdefault((g.other_gram.shape[-1], g.other_gram.dtype, g.other_gram.device), []).append(i)
    out: List[Optional[tuple]] = [None] * len(groups)
    for members in batches.values():
        batch = [groups[i] for i in members]
        one = len(batch) == 1
        gram = batch[0].other_gram if one else torch.cat([g.other_gram for g in batch])
        cross = batch[0].other_cross if one else torch.cat([g.other_cross for g in batch])
        inv_scale_sq = batch[0].inv_scale_sq if one else torch.cat([g.inv_scale_sq for g in batch])
        step = batch[0].step if one else torch.cat([g.step for g in batch])
        # NOTE: P is formed from the Cholesky factor of the *damped* Gram (never by inverting a raw
        # Gram) and applied with bmm: for r ≤ 128 this is as accurate as cholesky_solve and several
        # times faster than a batched triangular solve with d right-hand sides. Scalars (1/s²) are
        # folded into the r×r matrices so that the d-sized tensors see as few passes as possible.
        inverse = torch.cholesky_inverse(damped_cholesky(gram, hp.damping))  # P
        carry = torch.bmm(inverse, cross)  # P · C_Y
        precond = inverse * inv_scale_sq[:, None, None]  # P / s²
        if not hp.adaptive:  # AltLoRA: β1 and 1−β1 folded in too (AltLoRA+ applies them in a lerp)
            precond = precond * (1.0 - hp.beta1)
            carry = carry * hp.beta1
        new_step = step + 1.0
        sizes = [len(g.params) for g in batch]
        parts = [precond.split(sizes), carry.split(sizes), new_step.split(sizes)]
        if hp.adaptive:
            # (M/b1) / (sqrt(V/b2) + ε) = (M·sqrt(b2)/b1) / (sqrt(V) + ε·sqrt(b2)), b = 1 − βⁿ per
            # layer: the bias corrections become two (L, 1, 1) factors, the numerator's and ε's,
            # and the d-sized work two passes and one addcdiv instead of five.
            root_bias2 = (1.0 - torch.pow(hp.beta2, new_step)).sqrt_()[:, None, None]
            bias1 = (1.0 - torch.pow(hp.beta1, new_step))[:, None, None]
            parts += [(root_bias2 / bias1).split(sizes), (hp.eps * root_bias2).split(sizes)]
        for position, i in enumerate(members):
            precond_i, carry_i, step_i, *bias_i = (part[position] for part in parts)
            out[i] = (precond_i, carry_i, step_i, tuple(bias_i) if hp.adaptive else None)
    return out


def _decayed(x: torch.Tensor, hp: PhaseHyperParams, out: torch.Tensor) -> torch.Tensor:
    """``(1 − η·γ)·x`` written into ``out`` (a spent temporary of x's shape and dtype)."""
    if hp.weight_decay:
        return torch.mul(x, 1.0 - hp.lr * hp.weight_decay, out=out)
    return out.copy_(x)


def _phase_update_group(g: FactorGroup, hp: PhaseHyperParams, found_inf: Optional[torch.Tensor],
                        precond: torch.Tensor, carry: torch.Tensor, new_step: torch.Tensor,
                        bias: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    t = g.transposed
    # Without found_inf every state buffer is written in place by the op that computes it; with
    # it, new values go to temporaries and a torch.where keeps the old ones on a skipped phase.
    direct = found_inf is None
    stored = torch.stack(list(g.params))
    # The math runs in the state's dtype: promote_types(param dtype, float32) (float64 stays float64).
    compute = g.momentum.dtype
    x_old = stored.to(compute)
    grad = torch.stack(list(g.grads)).to(compute)

    # precond and carry come from _per_layer_factors (for AltLoRA with β1 and 1−β1 folded in).
    momentum_out = g.momentum if direct else None
    if hp.adaptive:
        scaled_grad = _left(precond, grad, t)  # g̃
        carried = _left(carry, g.momentum, t)  # M̃
        new_momentum = torch.lerp(carried, scaled_grad, 1.0 - hp.beta1, out=momentum_out)
        if direct:
            new_variance = g.variance.mul_(hp.beta2).addcmul_(scaled_grad, scaled_grad, value=1.0 - hp.beta2)
        else:
            new_variance = torch.addcmul(g.variance * hp.beta2, scaled_grad, scaled_grad, value=1.0 - hp.beta2)
        numerator_factor, eps_factor = bias  # the bias corrections (_per_layer_factors)
        # NOTE: carried, scaled_grad and grad are spent here; the denominator, the numerator and
        # the new factor reuse them. Each (L, *shape) temporary is a fresh allocation otherwise,
        # on the CPU often a fresh mapping whose pages fault in at every step.
        denominator = torch.sqrt(new_variance, out=carried).add_(eps_factor)
        numerator = torch.mul(new_momentum, numerator_factor, out=scaled_grad)
        x_new = _decayed(x_old, hp, out=grad).addcdiv_(numerator, denominator, value=-hp.lr)
    else:
        carried = _left(carry, g.momentum, t)  # β1·M̃ (carry = β1·P·C_Y)
        new_momentum = _left_add(carried, precond, grad, t, out=momentum_out)  # precond = (1−β1)·P/s²
        x_new = _decayed(x_old, hp, out=grad).sub_(new_momentum, alpha=hp.lr)  # grad is spent: reused

    new_stored = x_new.to(stored.dtype)
    reference = x_old if g.snapshot is None else g.snapshot.to(compute)
    if direct:
        written = new_stored.to(compute)
        _row_products(written, reference, t, out=g.cross)
        _row_products(written, written, t, out=g.gram)
        g.other_cross.copy_(g.other_gram)
        g.step.copy_(new_step)
    else:
        # NOTE: on a skipped phase every output keeps its old value; `cross` in particular cannot
        # be recomputed from the unchanged factor.
        skip = found_inf != 0
        new_stored = torch.where(skip, stored, new_stored)
        written = new_stored.to(compute)
        g.cross.copy_(torch.where(skip, g.cross, _row_products(written, reference, t)))
        g.gram.copy_(torch.where(skip, g.gram, _row_products(written, written, t)))
        g.other_cross.copy_(torch.where(skip, g.other_cross, g.other_gram))
        g.momentum.copy_(torch.where(skip, g.momentum, new_momentum))
        if hp.adaptive:
            g.variance.copy_(torch.where(skip, g.variance, new_variance))
        g.step.copy_(torch.where(skip, g.step, new_step))
    torch._foreach_copy_(list(g.params), list(new_stored.unbind(0)))


def unavailable_reason(device=None):
    """The torch backend runs on every device."""
    return None


phase_update = phase_update_torch  # the name every backend module exports (see backends.py)
