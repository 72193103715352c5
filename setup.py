"""jft: fine-tuning language models in JAX/Flax."""

import setuptools

setuptools.setup(
  name="jft",
  version="0.1.0",
  description="JAX/Flax fine-tuning: pretraining, SFT, LoRA, QLoRA, DPO; "
  "Llama, Mistral, Qwen and Gemma checkpoints.",
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
    "ml-dtypes>=0.4",
    "tokenizers>=0.20",  # tokenizer.json (Hugging Face tokenizers)
    "jinja2>=3.1",  # chat templates
    "matplotlib>=3.8",  # WORKDIR/curves.png, jft.plot, sweep plots
  ],
  extras_require={
    # Weights & Biases logging (config.wandb.enabled); never imported
    # otherwise.
    "wandb": ["wandb>=0.17"],
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",  # two workers: the suite's wall time halves-ish
      "hypothesis>=6",  # property-based fuzzing of the data readers
      "ruff>=0.6",
      "nbformat>=5",
      "nbclient>=0.10",
      "ipykernel>=6",
      # Parity tests run transformers and PEFT themselves, on CPU torch.
      # 2.13.0 is the CPU build this project's machines serve; an unpinned
      # torch would pull a multi-GB CUDA build.
      "torch==2.13.0",
      "transformers>=4.45",
      "peft>=0.13",
      "wandb>=0.17",  # the W&B writer, tested offline
      "lm-eval>=0.4",  # jft.interop.lm_eval, on local task files
    ],
    # Standard benchmarks through EleutherAI's lm-evaluation-harness:
    # python -m jft.interop.lm_eval --model jft --model_args source=RUN ...
    "lm_eval": ["lm-eval>=0.4"],
    # bench/compare.py: jft against transformers, PEFT and TRL side by
    # side (written against TRL 1.16's DPOTrainer and DPOConfig).
    "bench": [
      "torch==2.13.0",
      "transformers>=4.45",
      "peft>=0.13",
      "trl>=1.16",
    ],
  },
)
