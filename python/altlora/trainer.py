"""AltLoRA and AltLoRA+ in Hugging Face ``transformers.Trainer``.

Two ways in, both of which hand the optimizer the model (LoRA pairs are found by module, so a
list of parameters is not enough):

1. The factory form of ``optimizer_cls_and_kwargs``, in one line::

       trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                         optimizer_cls_and_kwargs=altlora.trainer.altlora_optimizer(lr=3e-2))

   transformers (5.x) treats a first element that is not a ``torch.optim.Optimizer`` subclass as
   a factory and calls ``AltLoRAFactory()(model, **kwargs)`` with the model it is about to train.
   The learning rate and every other setting come from the helper's arguments, not from
   ``TrainingArguments``. (Passing ``(altlora.AltLoRA, {...})`` instead would hand the optimizer
   plain parameter groups: it cannot tell which tensors form LoRA pairs.)

2. A ``create_optimizer`` override: :class:`AltLoRATrainer` (a ``Trainer`` subclass, built when
   first used, so importing this module does not import transformers) or
   :class:`AltLoRATrainerMixin` for a Trainer subclass of your own. ``lr`` defaults to
   ``args.learning_rate`` and ``weight_decay`` to ``args.weight_decay`` (AltLoRA+ also takes
   ``adam_beta1/2`` and ``adam_epsilon``); ``altlora_kwargs`` overrides any of them.

Either way the Trainer's LR scheduler is built on the optimizer's ``param_groups`` (the LoRA group
and the AdamW group of the other trainable parameters, each scaled from its own initial lr), and
its checkpoints save and restore the optimizer through ``state_dict()``, so
``resume_from_checkpoint`` continues the alternating schedule where it stopped.

DeepSpeed ZeRO cannot be supported (see :mod:`altlora.deepspeed_guard`); both ways raise a
``ValueError`` naming the alternatives when they find it.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

from torch import nn

from .deepspeed_guard import check_not_deepspeed, deepspeed_error
from .optimizers import OPTIMIZERS
from .options import Options, option_names

__all__ = ["VARIANTS", "AltLoRAFactory", "altlora_optimizer", "AltLoRATrainerMixin", "AltLoRATrainer"]  # noqa: F822 (lazy)

VARIANTS = OPTIMIZERS

# Arguments the Trainer (or the model) supplies; a user passing them means a misunderstanding.
_SUPPLIED_BY_TRAINER = ("params", "model")


def _optimizer_class(variant: Any) -> type:
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r} (expected one of {', '.join(map(repr, VARIANTS))})")
    return VARIANTS[variant]


def _check_kwargs(variant: str, kwargs: Dict[str, Any]) -> None:
    """Fail when the helper is called, not when training starts, on an argument the optimizer lacks."""
    for name in _SUPPLIED_BY_TRAINER:
        if name in kwargs:
            raise ValueError(f"Invalid argument {name!r}: the Trainer passes the model to the optimizer itself")
    cls = _optimizer_class(variant)
    try:
        bound = inspect.signature(cls).bind(None, **kwargs)
    except TypeError as error:
        raise ValueError(f"{cls.__name__}: {error}") from None
    bound.apply_defaults()
    hparams = dict(bound.arguments)
    hparams.pop("params")
    options = hparams.pop("options", {})
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise ValueError(f"{cls.__name__}: got an unexpected keyword argument {unknown[0]!r}")
    # The values too, now rather than when the Trainer builds the optimizer (lr=nan, a bad schedule).
    Options(**options)
    cls.variant.check(hparams, "")


class AltLoRAFactory:
    """What ``optimizer_cls_and_kwargs`` names: the Trainer instantiates it with no arguments and
    calls it with the model and the keyword arguments (``variant`` plus the optimizer's own)."""

    def __call__(self, model: nn.Module, variant: str = "altlora", **kwargs: Any):
        check_not_deepspeed(model=model)
        return _optimizer_class(variant)(model, **kwargs)


def altlora_optimizer(lr: float, variant: str = "altlora", **kwargs: Any) -> Tuple[type, Dict[str, Any]]:
    """The ``optimizer_cls_and_kwargs`` tuple for ``transformers.Trainer``.

    Args:
        lr: η of the LoRA factors (AltLoRA's good lr is on another scale than AdamW's; AltLoRA+'s
            is on AdamW's).
        variant: ``"altlora"`` (:class:`~altlora.AltLoRA`, default) or ``"altloraplus"``
            (:class:`~altlora.AltLoRAPlus`).
        **kwargs: any other argument of that optimizer (``momentum``/``betas``, ``damping``,
            ``schedule``, ``other_lr``, ...), checked here.
    """
    _optimizer_class(variant)
    kwargs = {"lr": lr, **kwargs}
    _check_kwargs(variant, kwargs)
    return AltLoRAFactory, {"variant": variant, **kwargs}


class AltLoRATrainerMixin:
    """Put before ``transformers.Trainer`` in a subclass's bases: its ``create_optimizer`` builds
    AltLoRA (``altlora_variant``) on the model, with ``altlora_kwargs`` over settings taken from
    ``self.args``."""

    altlora_variant: str = "altlora"
    altlora_kwargs: Optional[Dict[str, Any]] = None

    def altlora_settings(self) -> Dict[str, Any]:
        """The optimizer's keyword arguments: from ``TrainingArguments``, then ``altlora_kwargs``."""
        args = self.args
        settings: Dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
        if self.altlora_variant == "altloraplus":
            settings.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        settings.update(self.altlora_kwargs or {})
        return settings

    def create_optimizer(self, model: Optional[nn.Module] = None):
        if self.optimizer is None:
            if getattr(self, "is_deepspeed_enabled", False):
                raise deepspeed_error("this Trainer has DeepSpeed enabled")
            check_not_deepspeed(self.args)
            opt_model = self.model if model is None else model
            settings = self.altlora_settings()
            _check_kwargs(self.altlora_variant, settings)
            self.optimizer = AltLoRAFactory()(opt_model, self.altlora_variant, **settings)
        return self.optimizer


def _build_trainer_class() -> type:
    import transformers

    class AltLoRATrainer(AltLoRATrainerMixin, transformers.Trainer):
        """``transformers.Trainer`` that trains with AltLoRA / AltLoRA+.

        Takes the Trainer's arguments plus ``altlora_variant`` (``"altlora"`` or ``"altloraplus"``)
        and ``altlora_kwargs`` (optimizer arguments over those taken from ``args``).
        """

        def __init__(self, *args, altlora_variant: str = "altlora", altlora_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
            _optimizer_class(altlora_variant)
            self.altlora_variant = altlora_variant
            self.altlora_kwargs = dict(altlora_kwargs or {})
            super().__init__(*args, **kwargs)

    AltLoRATrainer.__module__ = __name__
    return AltLoRATrainer


def __getattr__(name: str):
    # AltLoRATrainer subclasses transformers.Trainer: build it on first use so that `import altlora`
    # never imports transformers.
    if name == "AltLoRATrainer":
        cls = _build_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
