"""Online RL's data source: rollouts of the current policy, scored.

PPO and GRPO train through the same loop as every objective; this source
stands where a JSONL iterator stands. `next(state)` returns the next
minibatch; when the current rollout is used up it makes a new one with the
policy in `state`:

  1. takes `rl.prompts_per_rollout` prompts (a seeded pass over the pool),
     each `group_size` times (`ppo.num_generations`, `grpo.num_generations`);
  2. samples completions with the KV-cache decoder (`rl.temperature`,
     `top_k`, `top_p`, `max_new_tokens`), outside any jitted update;
  3. scores them (`jft.rl.rewards`), and runs the policy (old log-probs,
     values) and the reference (log-probs) over them, jitted, once;
  4. adds what the objective's loss reads (advantages, returns: `_finish`,
     per algorithm), then serves `rl.epochs` shuffled passes in minibatches
     of `config.batch_size` rows.

Every row is `[bos] + prompt + completion` (the completion through its eos)
right-padded to `seq_len`; `weights` marks the completion's tokens, so only
generated tokens carry loss. Each rollout is also saved
(`WORKDIR/rollouts/round-N.npz`) so a resumed run continues mid-rollout
exactly, and a sample of every rollout goes to `WORKDIR/rollouts/
samples.jsonl` with its scores.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jft import generate, losses, sharding
from jft.data import sources
from jft.models import transformer
from jft.rl import rewards as reward_fns


def pack_rows(prompts, completions, seq_len: int, pad_id: int) -> dict:
  """Right-padded [N, seq_len] rows of prompt + completion; `weights` are 1
  on the completion's tokens (as targets), 0 elsewhere."""
  n = len(prompts)
  out = {
    "inputs": np.full((n, seq_len), pad_id, np.int32),
    "targets": np.full((n, seq_len), pad_id, np.int32),
    "weights": np.zeros((n, seq_len), np.float32),
    "positions": np.zeros((n, seq_len), np.int32),
    "segment_ids": np.zeros((n, seq_len), np.int32),
  }
  for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
    seq = list(p) + list(c)
    if len(seq) > seq_len + 1:
      raise ValueError(
        f"a prompt of {len(p)} tokens plus {len(c)} generated ones exceeds "
        f"config.seq_len + 1 = {seq_len + 1}; raise config.seq_len or lower "
        "config.rl.max_new_tokens"
      )
    t = len(seq) - 1
    out["inputs"][i, :t] = seq[:-1]
    out["targets"][i, :t] = seq[1:]
    out["weights"][i, len(p) - 1 : t] = 1.0
    out["positions"][i, :t] = np.arange(t)
    out["segment_ids"][i, :t] = 1
  return out


def split_completion(ids, eos_ids) -> tuple[list[int], bool]:
  """Generated ids through the first eos (kept: the model learns to stop),
  and whether it stopped."""
  ids, eos = list(ids), set(eos_ids)
  for i, t in enumerate(ids):
    if t in eos:
      return ids[: i + 1], True
  return ids, False


def _place_rows(x, mesh):
  spec = sharding.batch_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, spec, lambda i: x[i])


class Rollouts:
  """Base rollout source; `_finish` adds the algorithm's fields."""

  group_size = 1
  needs_values = False

  def __init__(
    self, config, objective, tokenizer, prompts, apply_fn, workdir, mesh
  ):
    if not prompts:
      raise ValueError("online RL needs prompts; the prompt file is empty")
    self.config, self.objective, self.tok = config, objective, tokenizer
    self.prompts, self.apply_fn, self.mesh = list(prompts), apply_fn, mesh
    self.workdir = workdir
    rl = config.rl
    self.n_rows = rl.prompts_per_rollout * self.group_size
    if self.n_rows % config.batch_size:
      raise ValueError(
        f"config.rl.prompts_per_rollout ({rl.prompts_per_rollout}) x group "
        f"size ({self.group_size}) = {self.n_rows} rows is not a multiple of "
        f"config.batch_size ({config.batch_size})"
      )
    self.generator = generate.Generator(
      apply_fn,
      apply_fn.config,
      max_new=rl.max_new_tokens,
      eos_ids=tokenizer.eos_ids,
      pad_id=tokenizer.pad_id,
      vocab_size=tokenizer.vocab_size,
      sampling=generate.Sampling(rl.temperature, rl.top_k, rl.top_p),
      batch_size=max(self.n_rows, 8),
      mesh=mesh,
    )
    self.funcs = reward_fns.build(config, self._reward_model_fn())
    self._stats = jax.jit(self._policy_stats)
    self.round, self.pos, self.prompt_pos = -1, 0, 0
    self.buffer, self.order = None, []

  # --------------------------------------------------------- checkpoints
  def get_state(self) -> dict:
    return {"round": self.round, "pos": self.pos, "prompt_pos": self.prompt_pos}

  def set_state(self, state) -> None:
    state = sources.state_dict(state)
    self.round, self.pos = state["round"], state["pos"]
    self.prompt_pos = state["prompt_pos"]
    self.buffer = None
    if self.round >= 0:
      self.buffer = dict(np.load(self._buffer_path(self.round)))
      self.order = self._order(self.round)

  def start_prefetch(self) -> None:  # grain's restore calls it
    pass

  def _buffer_path(self, r: int) -> str:
    return os.path.join(self.workdir, "rollouts", f"round-{r:06d}.npz")

  # -------------------------------------------------------------- serving
  def __next__(self):
    raise TypeError("Rollouts need the policy: call next(state)")

  def next(self, state) -> tuple[dict, dict]:
    """This process's rows of the next minibatch, and the metrics of a new
    rollout when one was made for it (else {})."""
    metrics = {}
    if self.buffer is None or self.pos >= len(self.order):
      metrics = self._new_round(state)
    rows = self.order[self.pos]
    self.pos += 1
    n, i = jax.process_count(), jax.process_index()
    mine = np.array_split(rows, n)[i]
    return {k: v[mine] for k, v in self.buffer.items()}, metrics

  def _order(self, r: int) -> list[np.ndarray]:
    """Minibatches of row indices: `rl.epochs` seeded shuffles."""
    rng = np.random.default_rng([self.config.seed, r])
    b = self.config.batch_size
    out = []
    for _ in range(self.config.rl.epochs):
      perm = rng.permutation(self.n_rows)
      out += [perm[j : j + b] for j in range(0, self.n_rows, b)]
    return out

  def _next_prompts(self) -> list[dict]:
    """The next `prompts_per_rollout` rows of a seeded pass over the pool
    (a new shuffle each pass)."""
    k = self.config.rl.prompts_per_rollout
    out = []
    while len(out) < k:
      epoch, at = divmod(self.prompt_pos, len(self.prompts))
      perm = np.random.default_rng([self.config.seed, 7, epoch]).permutation(
        len(self.prompts)
      )
      take = min(k - len(out), len(self.prompts) - at)
      out += [self.prompts[j] for j in perm[at : at + take]]
      self.prompt_pos += take
    return out

  # ------------------------------------------------------------ rollouts
  def _sample_once(self, params, key) -> dict:
    """The next prompts, each `group_size` times, sampled once and scored:
    {rows, prompt_ids, completions, stopped, texts, scores, metrics}."""
    rows = [r for r in self._next_prompts() for _ in range(self.group_size)]
    tok = self.tok
    prompt_ids = [list(tok.bos_prefix) + tok.encode(r["prompt"]) for r in rows]
    new = self.generator.generate(params, prompt_ids, key)
    comps = [split_completion(ids, tok.eos_ids) for ids in new]
    stopped = [s for _, s in comps]
    texts = [
      tok.decode([t for t in c if t not in tok.eos_ids]) for c, _ in comps
    ]
    scores, metrics = reward_fns.score(self.funcs, rows, texts, stopped)
    return {
      "rows": rows,
      "prompt_ids": prompt_ids,
      "completions": [c for c, _ in comps],
      "stopped": stopped,
      "texts": texts,
      "scores": scores,
      "metrics": metrics,
    }

  def _sample(self, params, key) -> dict:
    """With `rl.filter_groups` (DAPO's dynamic sampling): keeps sampling
    fresh prompts, up to `rl.max_gen_batches` batches, until
    `prompts_per_rollout` groups have rewards that differ; a group whose
    answers all score alike has zero advantage and only dilutes the
    update. Short of that, groups of equal rewards fill the rest, the
    earliest first. The reward functions' means are the first batch's:
    the policy as sampled, not the kept groups."""
    rl = self.config.rl
    first = self._sample_once(params, key)
    if not rl.filter_groups or self.group_size < 2:
      return first
    k, n = rl.prompts_per_rollout, self.group_size
    varied, alike, zero, batches = [], [], [], 0
    s = first
    while True:
      batches += 1
      groups = s["scores"].reshape(-1, n)
      for j, differs in enumerate(groups.std(-1) > 0):
        (varied if differs else alike).append((s, j))
        zero.append(not differs)
      if len(varied) >= k or batches >= rl.max_gen_batches:
        break
      s = self._sample_once(params, jax.random.fold_in(key, batches))
    picked = (varied + alike)[:k]
    out = {
      f: [x for s, j in picked for x in s[f][j * n : (j + 1) * n]]
      for f in ("rows", "prompt_ids", "completions", "stopped", "texts")
    }
    out["scores"] = np.concatenate(
      [s["scores"][j * n : (j + 1) * n] for s, j in picked]
    )
    out["metrics"] = {
      **first["metrics"],
      "filter/gen_batches": float(batches),
      "filter/sampled_zero_std_frac": float(np.mean(zero)),
      "filter/kept_varied_frac": min(len(varied), k) / k,
    }
    return out

  def _new_round(self, state) -> dict:
    self.round += 1
    self.pos = 0
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), self.round)
    params = state.params
    s = self._sample(params, key)
    rows, texts, scores = s["rows"], s["texts"], s["scores"]
    stopped, metrics = s["stopped"], s["metrics"]
    batch = pack_rows(
      s["prompt_ids"], s["completions"], self.config.seq_len, self.tok.pad_id
    )
    ref = self.objective.reference_tree(params, state.ref)
    stats = self._run(params, ref, batch)
    batch = self._finish(batch, stats, scores, metrics)
    lengths = batch["weights"].sum(-1)
    metrics.update(
      {
        "objective/scores": float(scores.mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/clipped_ratio": float(1 - np.mean(stopped)),
        "rollouts/round": float(self.round),
      }
    )
    self.buffer, self.order = batch, self._order(self.round)
    if jax.process_index() == 0:
      self._save(batch, rows, texts, scores)
    return metrics

  def _run(self, params, ref, batch) -> dict:
    """Old log-probs (+ values) of the policy and the reference's, host."""
    inputs = {k: v for k, v in batch.items()}
    if self.mesh is not None:
      inputs = {k: _place_rows(v, self.mesh) for k, v in inputs.items()}
    out = self._stats(params, ref, inputs)
    return jax.tree.map(np.asarray, sharding.to_host(out))

  def _policy_stats(self, params, ref, batch) -> dict:
    def forward(p):
      return self.apply_fn(
        p, batch["inputs"], batch["positions"], batch["segment_ids"]
      )

    temp = self.config.rl.temperature
    out = forward(params)
    logits = losses.tempered(transformer.logits_of(out), temp)
    res = {
      "old_logp": losses.token_logps(logits, batch["targets"]),  # [N, T]
      "entropy": losses.token_entropy(logits),
    }
    if self.needs_values:
      res["old_values"] = self.objective.values(
        self.apply_fn, params, batch, out
      )  # [N, T]
    if ref is not None:
      ref_logits = losses.tempered(
        transformer.logits_of(forward(jax.lax.stop_gradient(ref))), temp
      )
      res["ref_logp"] = losses.token_logps(ref_logits, batch["targets"])
    return res

  def _finish(self, batch, stats, scores, metrics) -> dict:
    raise NotImplementedError

  def _save(self, batch, rows, texts, scores) -> None:
    os.makedirs(os.path.dirname(self._buffer_path(self.round)), exist_ok=True)
    path = self._buffer_path(self.round)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **batch)
    os.replace(tmp, path)
    k = self.config.rl.samples_to_log
    with open(
      os.path.join(self.workdir, "rollouts", "samples.jsonl"), "a"
    ) as fh:
      for r, t, s in list(zip(rows, texts, scores, strict=True))[:k]:
        fh.write(
          json.dumps(
            {
              "round": self.round,
              "prompt": r["prompt"],
              "completion": t,
              "score": float(s),
            }
          )
          + "\n"
        )

  # --------------------------------------------------------- reward model
  def _reward_model_fn(self):
    path = self.config.rl.reward_model
    if not path:
      return None
    return reward_model_scorer(path, self.tok, self.config.seq_len, self.mesh)


def score_rows(sequences, width: int, pad_id: int) -> dict:
  """Right-padded [N, width] rows of whole sequences (unshifted: a reward
  model reads every token, the final eos included, as input)."""
  n = len(sequences)
  out = {
    "inputs": np.full((n, width), pad_id, np.int32),
    "positions": np.zeros((n, width), np.int32),
    "segment_ids": np.zeros((n, width), np.int32),
  }
  for i, seq in enumerate(sequences):
    if len(seq) > width:
      raise ValueError(f"a sequence of {len(seq)} tokens exceeds {width}")
    out["inputs"][i, : len(seq)] = seq
    out["positions"][i, : len(seq)] = np.arange(len(seq))
    out["segment_ids"][i, : len(seq)] = 1
  return out


def reward_model_scorer(path: str, tok, seq_len: int, mesh=None):
  """The 'reward_model' reward function: a jft reward model's score (run
  directory `path`, `model.head='score'`) of `[bos] + prompt + completion +
  [eos]`, read at the eos, the token the reward model was trained to score
  at. Rows are `seq_len + 1` wide: a rollout row holds that many tokens."""
  from jft import checkpoint
  from jft.data import tokenizer as tokenizers

  with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
    cfg = transformer.config_from_dict(json.load(fh)["model"])
  if cfg.head != "score":
    raise ValueError(
      f"config.rl.reward_model={path!r} is not a reward model "
      f"(model.head={cfg.head!r}; train one with configs/reward.py)"
    )
  if tokenizers.load_tokenizer_dir(path).files != tok.files:
    raise ValueError(
      f"config.rl.reward_model={path!r} uses another tokenizer than the "
      "policy; they must share one"
    )
  mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  params = checkpoint.load_params(path, mesh)
  if cfg.peft.active:
    from jft.peft import lora

    params = jax.tree.map(np.asarray, lora.merge(params, cfg))
    cfg = lora.base_config(cfg)
  model = transformer.Transformer(cfg)

  @jax.jit
  def scores(p, batch):
    s = model.apply(
      {"params": p},
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
    )  # [N, T]
    last = jnp.maximum(jnp.sum(batch["segment_ids"] > 0, -1) - 1, 0)
    return jnp.take_along_axis(s, last[:, None], -1)[:, 0]  # [N]

  def reward(rows, completions, stopped):
    del stopped
    seqs = [
      list(tok.bos_prefix) + tok.encode(r["prompt"]) + tok.encode(c)
      for r, c in zip(rows, completions, strict=True)
    ]
    seqs = [q + [tok.eos_id] for q in seqs]
    batch = score_rows(seqs, seq_len + 1, tok.pad_id)
    return np.asarray(sharding.to_host(scores(params, batch))).tolist()

  return reward


class PPORollouts(Rollouts):
  """PPO: per-token KL penalty to the reference, the score at the last
  completion token, GAE over the completion, whitened advantages. With
  `ppo.num_generations` G > 1 each prompt is sampled G times and each score
  has the mean of its prompt's other samples subtracted (RLOO) before GAE."""

  needs_values = True

  def __init__(self, config, *args, **kwargs):
    self.group_size = config.ppo.num_generations
    super().__init__(config, *args, **kwargs)
    self.kl_coef = self.config.ppo.kl_coef

  def get_state(self) -> dict:
    return {**super().get_state(), "kl_coef": self.kl_coef}

  def set_state(self, state) -> None:
    super().set_state(state)
    self.kl_coef = sources.state_dict(state)["kl_coef"]

  def next(self, state) -> tuple[dict, dict]:
    """As the base source; during `ppo.critic_warmup_steps` the policy's
    advantages are zero, so only the critic (value loss) learns."""
    batch, metrics = super().next(state)
    step = self.round * len(self.order) + self.pos - 1  # this minibatch's
    if step < self.config.ppo.critic_warmup_steps:
      batch = {**batch, "advantages": np.zeros_like(batch["advantages"])}
    return batch, metrics

  def _finish(self, batch, stats, scores, metrics) -> dict:
    p = self.config.ppo
    mask = batch["weights"]  # [N, T]
    kl = (stats["old_logp"] - stats["ref_logp"]) * mask  # [N, T] (k1)
    rewards = -self.kl_coef * kl
    last = np.maximum(mask.shape[1] - 1 - np.argmax(mask[:, ::-1], -1), 0)
    # The score goes on each completion's last generated token, ended by
    # eos or cut at max_new_tokens alike (as TRL; `missing_eos_penalty`
    # marks the cut ones); a row with no generated token gets none.
    generated = mask[np.arange(len(mask)), last] > 0
    score = scores.copy()
    if p.missing_eos_penalty:
      ends = batch["targets"][np.arange(len(mask)), last]
      no_eos = ~np.isin(ends, list(self.tok.eos_ids))
      score = score - p.missing_eos_penalty * no_eos
    raw = score
    if self.group_size > 1 and p.group_baseline == "group_norm":
      score = np.asarray(losses.group_advantages(score, self.group_size))
    elif self.group_size > 1:  # the prompt's level: RLOO baseline
      score = np.asarray(losses.leave_one_out(score, self.group_size))
    rewards[np.arange(len(mask)), last] += np.where(generated, score, 0.0)
    adv, ret = losses.gae(
      jnp.asarray(rewards),
      jnp.asarray(stats["old_values"] * mask),
      jnp.asarray(mask),
      p.gamma,
      p.lam,
    )
    adv = losses.whiten(adv, jnp.asarray(mask))
    seq_kl = kl.sum(-1)
    metrics.update(
      {
        "objective/kl": float(seq_kl.mean()),
        "objective/entropy": float(
          (stats["entropy"] * mask).sum() / max(mask.sum(), 1)
        ),
        "objective/non_score_reward": float(-self.kl_coef * seq_kl.mean()),
        "objective/rlhf_reward": float(
          raw.mean() - self.kl_coef * seq_kl.mean()
        ),
        "objective/kl_coef": float(self.kl_coef),
      }
    )
    if p.adaptive_kl:  # Ziegler et al. 2019's proportional controller
      err = np.clip(seq_kl.mean() / p.kl_target - 1, -0.2, 0.2)
      self.kl_coef *= 1 + err * self.n_rows / p.kl_horizon
    return {
      **batch,
      "old_logp": stats["old_logp"],
      "old_values": stats["old_values"],
      "advantages": np.asarray(adv, np.float32),
      "returns": np.asarray(ret, np.float32),
    }


class GRPORollouts(Rollouts):
  """GRPO: `num_generations` samples per prompt, group-normalised
  advantages (one per completion, on every one of its tokens)."""

  def __init__(self, config, *args, **kwargs):
    self.group_size = config.grpo.num_generations
    super().__init__(config, *args, **kwargs)

  def _finish(self, batch, stats, scores, metrics) -> dict:
    g = self.config.grpo
    scale = (
      g.loss_type != "dr_grpo"
      if g.scale_rewards == "auto"
      else (g.scale_rewards == "true")
    )
    adv = np.asarray(
      losses.group_advantages(jnp.asarray(scores), self.group_size, scale)
    )
    groups = scores.reshape(-1, self.group_size)
    mask = batch["weights"]
    metrics.update(
      {
        "reward": float(scores.mean()),
        "reward_std": float(groups.std(-1, ddof=1).mean()),
        "frac_reward_zero_std": float(np.mean(groups.std(-1) == 0)),
        "objective/entropy": float(
          (stats["entropy"] * mask).sum() / max(mask.sum(), 1)
        ),
      }
    )
    per_token = lambda x: np.broadcast_to(x[:, None], mask.shape).astype(
      np.float32
    )
    out = {
      **batch,
      "old_logp": stats["old_logp"],
      "advantages": per_token(adv),  # [N, T]: the row's advantage
      "scores": per_token(scores),  # [N, T]: the row's reward (controls)
    }
    if "ref_logp" in stats:
      out["ref_logp"] = stats["ref_logp"]
    return out
