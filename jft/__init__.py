"""jft: fine-tuning language models in JAX/Flax."""
