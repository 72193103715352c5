"""jft: fine-tuning language models in JAX/Flax."""

import setuptools

setuptools.setup(
  name="jft",
  version="0.1.0",
  description="JAX/Flax fine-tuning: pretraining, SFT, LoRA, QLoRA, DPO.",
  python_requires=">=3.11",
  packages=setuptools.find_packages(include=["jft", "jft.*"]),
  install_requires=[
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "sentencepiece>=0.2",
    "ml-collections>=1.0",
    "chex>=0.1.88",
    "absl-py>=2.0",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tensorboardX>=2.6",
  ],
  extras_require={
    "test": [
      "pytest>=8",
      "ruff>=0.6",
      "nbformat>=5",
      "nbclient>=0.10",
      "ipykernel>=6",
    ],
  },
)
