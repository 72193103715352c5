"""jft: fine-tuning language models in JAX/Flax.

`jft.load(source, adapter=None, dtype="float32")` loads a jft run directory
or a Hugging Face checkpoint (`hf:DIR`) for notebooks and scripts (see
`jft.api`); it is imported on first use, so `import jft.x` stays light.
"""


def __getattr__(name):
  if name in ("load", "Model"):
    from jft import api

    return getattr(api, name)
  raise AttributeError(f"module 'jft' has no attribute {name!r}")
