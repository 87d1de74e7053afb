"""Installs ``altlora`` (python/altlora) and ``altlora_kernels`` (the compute layer).

The native backend's C++ sources (csrc/) are not compiled at install time: they are installed
with the package and compiled on first use, or ahead with
``python -m altlora_kernels.native_phase_update`` (see csrc/README.md).
"""

from setuptools import setup

setup(
    name="altlora",
    version="0.1.0",
    description="AltLoRA and AltLoRA+ optimizers for LoRA adapters, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # csrc/ goes into the wheel as altlora_kernels/csrc (no Python in it: only its sources), where
    # altlora_kernels/native_phase_update.py looks first; in a checkout it finds ../csrc.
    packages=["altlora", "altlora.finetune", "altlora_kernels", "altlora_kernels.csrc"],
    package_dir={"altlora": "python/altlora", "altlora_kernels": "altlora_kernels", "altlora_kernels.csrc": "csrc"},
    package_data={"altlora_kernels.csrc": ["*.cpp", "*.h", "README.md"]},
    # ninja and setuptools: torch.utils.cpp_extension compiles the native backend with them at first use.
    install_requires=["torch>=2.4", "ninja", "setuptools>=70"],
    extras_require={
        "peft": ["peft>=0.10", "transformers>=4.40"],
        "test": ["pytest>=7", "peft>=0.10", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["altlora = altlora.cli:main"]},
    license="Apache-2.0",
)
