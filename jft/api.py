"""The small Python API for notebooks and scripts: `jft.load(...)`.

    model = jft.load("hf:/path/to/SmolLM2-135M")      # or a jft run dir
    model = jft.load("hf:BASE", adapter="ADAPTER_DIR")  # PEFT LoRA on top
    logits = model.logits(ids)                          # float32 [B, T, V]
    logp = model.token_logprobs(ids)                    # float32 [B, T-1]
    new = model.generate(ids, max_new_tokens=32)        # int32 [B, 32]
    texts = model.generate_text(["Hello"], max_new_tokens=32, chat=True)

It goes through the same code as training runs and the CLI: `jft.init`
resolves the source (weights read tensor by tensor, adapters from PEFT
files, the checkpoint's own tokenizer) and `jft.generate` decodes with a KV
cache.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import config as base_config
from jft import generate, init, sharding
from jft.interop import hf
from jft.models import transformer


class Model:
  """A loaded model: `tokenizer`, `config` (TransformerConfig), `params`."""

  def __init__(self, params, model_cfg, tokenizer, source: str, source_dir):
    self.params, self.config, self.tokenizer = params, model_cfg, tokenizer
    self.source, self._source_dir = source, source_dir
    self._apply = init_apply(model_cfg)
    self._forward = jax.jit(lambda p, ids: self._apply(p, ids, None, None))
    self._logprobs = jax.jit(
      lambda p, ids: next_token_logprobs(
        transformer.logits_of(self._apply(p, ids, None, None)), ids
      )
    )

  def __repr__(self) -> str:
    return f"jft.Model({self.source!r}, {self.config.family})"

  def logits(self, input_ids) -> np.ndarray:
    """float32 logits [B, T, V] of unpadded token ids [B, T] (a reward
    model's scores [B, T])."""
    ids = self._check_ids(input_ids)
    return np.asarray(jax.device_get(self._forward(self.params, ids)))

  def _check_ids(self, input_ids) -> np.ndarray:
    ids = _as_ids(input_ids)
    if ids.size and not (0 <= ids.min() and ids.max() < self.config.vocab_size):
      raise ValueError(
        f"input_ids outside the vocabulary [0, {self.config.vocab_size})"
      )
    return ids

  def token_logprobs(self, input_ids) -> np.ndarray:
    """float32 [B, T-1]: `out[b, t] = log p(ids[b, t+1] | ids[b, :t+1])`
    for token ids [B, T], over the model's whole vocabulary (as the training
    loss). Reduced on the device: the [B, T, V] logits stay there. Right
    padding changes nothing before it (attention is causal)."""
    ids = self._check_ids(input_ids)
    if self.config.head == "score":
      raise ValueError(f"{self!r} is a reward model: it has no LM head")
    return np.asarray(jax.device_get(self._logprobs(self.params, ids)))

  def scores(self, input_ids) -> np.ndarray:
    """A reward model's (`head='score'`) float32 score at every position
    [B, T]; a sequence's reward is the score at its last token."""
    if self.config.head != "score":
      raise ValueError(
        f"{self!r} has head {self.config.head!r}, not a reward model's 'score'"
      )
    return self.logits(input_ids)

  @functools.cache  # noqa: B019 (a Model lives as long as its compiled fns)
  def _generator(self, max_new, eos_ids, sampling):
    return generate.Generator(
      self._apply,
      self.config,
      max_new=max_new,
      eos_ids=eos_ids,
      pad_id=self.tokenizer.pad_id,
      vocab_size=self.tokenizer.vocab_size,
      sampling=sampling,
    )

  def generate(
    self,
    input_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_at_eos: bool = True,
    seed: int = 0,
  ) -> np.ndarray:
    """New tokens, int32 [B, max_new_tokens], for prompts of token ids.

    `input_ids` is [B, T] or a list of (ragged) lists; prompts are
    left-padded internally. With `stop_at_eos` the positions after a row's
    eos hold the pad id; without it exactly `max_new_tokens` are sampled.
    """
    prompts = _as_prompts(input_ids)
    if not prompts:
      return np.zeros((0, max_new_tokens), np.int32)
    eos = tuple(self.tokenizer.eos_ids) if stop_at_eos else ()
    sampling = generate.Sampling(temperature, top_k, top_p)
    gen = self._generator(max_new_tokens, eos, sampling)
    key = jax.random.PRNGKey(seed) if temperature > 0 else None
    return np.asarray(gen.generate(self.params, prompts, key), np.int32)

  def encode_prompt(self, prompt, chat: bool = False) -> list[int]:
    """Token ids of a prompt: a string (with `chat`, wrapped as one user
    turn), a list of chat messages, or already token ids."""
    tok = self.tokenizer
    if _is_ids(prompt):
      return [int(t) for t in prompt]
    if chat or not isinstance(prompt, str):
      msgs = (
        [{"role": "user", "content": prompt}]
        if isinstance(prompt, str)
        else prompt
      )
      text = tok.apply_chat_template(msgs, add_generation_prompt=True)
      return tok.encode(text)  # the template writes bos itself
    return list(tok.bos_prefix) + tok.encode(prompt)

  def generate_text(
    self,
    prompts: Sequence,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    chat: bool = False,
    seed: int = 0,
  ) -> list[str]:
    """Completions of text prompts (or chat message lists)."""
    ids = [self.encode_prompt(p, chat) for p in prompts]
    out = self.generate(
      ids, max_new_tokens, temperature, top_k, top_p, seed=seed
    )
    tok = self.tokenizer
    return [
      tok.decode(generate.truncate(o, tok.eos_ids, tok.decode, stop))
      for o in out.tolist()
    ]

  def save_hf(self, out: str, *, dtype: str | None = None, overwrite=False):
    """Writes the model (LoRA merged) as a Hugging Face checkpoint."""
    return hf.export_model(
      out,
      jax.device_get(self.params),
      self.config,
      tokenizer=self.tokenizer,
      source=self._source_dir,
      dtype=dtype,
      overwrite=overwrite,
    )


def init_apply(model_cfg):
  from jft.train import make_apply_fn

  return make_apply_fn(transformer.Transformer(model_cfg))


def next_token_logprobs(logits, ids):
  """log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1] from logits [B, T, V]."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  return jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]  # [B, T-1]


def _as_ids(input_ids) -> np.ndarray:
  ids = np.asarray(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be integer [B, T], got {ids.shape}")
  return ids.astype(np.int32)


def _is_ids(prompt) -> bool:
  """A list (or array) of token ids, as opposed to text or messages."""
  if isinstance(prompt, np.ndarray):
    return True
  return isinstance(prompt, list | tuple) and all(
    isinstance(t, int | np.integer) for t in prompt
  )


def _as_prompts(input_ids) -> list[list[int]]:
  if isinstance(input_ids, np.ndarray) or (
    input_ids and not isinstance(input_ids[0], list | tuple | np.ndarray)
  ):
    return _as_ids(input_ids).tolist()
  return [[int(t) for t in p] for p in input_ids]


def load(
  source: str,
  adapter: str | None = None,
  dtype: str = "float32",
  *,
  num_devices: int = 1,
) -> Model:
  """A model from a jft run directory or `hf:DIR` (+ a PEFT adapter dir).

  `dtype` is the parameter and compute dtype. Parameters are placed on the
  first `num_devices` devices (0 = all), FSDP-sharded when several.
  """
  if init.kind(source) in ("random", "stage"):
    raise ValueError(
      f"jft.load: source must be a jft run directory or 'hf:DIR', got "
      f"{source!r}"
    )
  c = base_config.base_config()
  c.init = source
  c.init_adapter = adapter or ""
  c.model.preset = ""
  c.model.dtype = c.model.param_dtype = dtype
  c.mesh.num_devices = num_devices
  tokenizer = init.find_tokenizer(c)
  model_cfg = init.model_config(c, tokenizer)
  mesh = sharding.make_mesh(c.mesh)
  rules = sharding.rules_from_config(c.mesh)
  params = init.init_params(c, model_cfg, mesh, rules)
  return Model(params, model_cfg, tokenizer, source, init.source_dir(c))
