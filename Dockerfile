# megatron-r1 GPU image: NGC PyTorch + the CUDA build of vLLM + this package.
#
# Notable choices (versions are build args so a cluster can bump them without editing this file):
# - Base: NGC PyTorch 25.12 (CUDA 13.1, cuDNN, NCCL, Python 3.12, Transformer Engine, apex; torch
#   2.10.0a0). It is the newest release whose contents are documented in what this repo could
#   check (NVIDIA's release notes for rel-25-12); NGC images bring the CUDA toolchain and cuDNN
#   headers that Transformer Engine's torch extension compiles against, and a CUDA 13 driver
#   stack matching the cu13 wheels below.
# - vLLM 0.32.0 pins torch==2.13.0 exactly (wheel metadata: torch==2.13.0, torchvision==0.28.0,
#   torchaudio==2.11.0, flashinfer-python==0.7.0.post1). NGC's torch is a source build with an
#   a0+git version that never satisfies that pin, and NGC pins its own torch in
#   /etc/pip/constraint.txt. So, as verl's NGC images do, we replace torch with the PyPI build
#   vLLM was compiled against, and drop the NGC extensions tied to the old torch ABI
#   (flash-attn, apex, TE's torch extension) rather than leave them importable-but-broken (that is the
#   conflict with NGC's apex: its amp_C / fused_layer_norm_cuda are built for NGC's torch ABI).
# - Transformer Engine is then rebuilt against the new torch: `transformer_engine_torch` ships as
#   an sdist and compiles against whatever torch is installed; its core library
#   (transformer_engine_cu13) is a prebuilt wheel. apex is rebuilt the same way, from a pinned
#   tag with its C++/CUDA extensions: megatron_r1's kernel registry uses its fused Adam (amp_C) and
#   fused RMSNorm when they import (megatron_r1/kernels/__init__.py).
# - When an NGC release ships torch 2.13.0 final, set NGC_TAG to it: the uninstall/reinstall of
#   torch then becomes a no-op and only the TE rebuild may still be needed.
# - ENTRYPOINT is the package's console script (setup.py: megatron-r1 = megatron_r1.cli:main);
#   tests/unit/test_dockerfile.py checks it and that every third-party import is installed.

ARG NGC_TAG=25.12
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG TORCHAUDIO_VERSION=2.11.0
ARG VLLM_VERSION=0.32.0
ARG TE_VERSION=2.20.2
ARG APEX_REF=25.09
ARG MAX_JOBS=16

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# NGC's constraint file pins the torch we are replacing; keep a copy for reference.
RUN mv /etc/pip/constraint.txt /etc/pip/constraint.ngc.txt && touch /etc/pip/constraint.txt

RUN pip uninstall -y torch torchvision torchaudio flash-attn apex \
        transformer_engine transformer_engine_torch transformer_engine_cu12 transformer_engine_cu13 \
 && pip install \
        "torch==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}" \
        "torchaudio==${TORCHAUDIO_VERSION}" \
        "vllm==${VLLM_VERSION}"

# --no-build-isolation: the extension must compile against the torch installed above, not a
# fresh one pip would fetch into an isolated build env.
RUN NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation \
        "transformer_engine[pytorch,core-cu13]==${TE_VERSION}"
RUN APEX_CPP_EXT=1 APEX_CUDA_EXT=1 MAX_JOBS=${MAX_JOBS} pip install -v --no-build-isolation \
        "apex @ git+https://github.com/NVIDIA/apex.git@${APEX_REF}"

WORKDIR /opt/megatron-r1
COPY . .
RUN pip install -e ".[gpu]" \
 && python -c "import torch, vllm, megatron_r1.cli; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

ENTRYPOINT ["megatron-r1"]
CMD ["--help"]
