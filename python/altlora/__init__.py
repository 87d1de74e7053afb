"""altlora: train LoRA adapters with the AltLoRA and AltLoRA+ optimizers.

>>> import altlora
>>> opt = altlora.AltLoRA(peft_model, lr=3e-2)          # LoRA pairs found by module
>>> opt = altlora.AltLoRAPlus(altlora.find_lora_pairs(model), lr=1e-3)
"""

from . import distributed, trainer
from .distributed import lora_shard_placement_fn
from .initialization import init_lora
from .layers import LoRALayer, find_lora_layers
from .lora_linear import LoRALinear
from .mgpo import MGPO
from .optimizers import DEFAULT_DAMPING, DEFAULT_OTHER_LR, AltLoRA, AltLoRAPlus
from .pairs import LoRAPair, find_lora_pairs
from .peft_fusion import FusionReport, fuse_peft, unfuse_peft
from .trainer import AltLoRATrainerMixin, altlora_optimizer

__version__ = "0.1.0"

__all__ = [
    "AltLoRA",
    "AltLoRAPlus",
    "LoRAPair",
    "find_lora_pairs",
    "find_lora_layers",
    "LoRALayer",
    "LoRALinear",
    "MGPO",
    "init_lora",
    "fuse_peft",
    "unfuse_peft",
    "FusionReport",
    "altlora_optimizer",
    "AltLoRATrainerMixin",
    "lora_shard_placement_fn",
    "distributed",
    "trainer",
    "DEFAULT_DAMPING",
    "DEFAULT_OTHER_LR",
    "__version__",
]
