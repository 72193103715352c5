"""jft.losses against numpy references written from the papers / TRL.

Each function has (a) a float64 numpy reference written independently here
(loops where they read clearer), compared on random inputs with padding at
two or more settings, with and without jit (chex.variants), and (b) a small
case worked out on paper, the arithmetic in a comment.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jft import losses
from jft.objectives import dpo

RNG = np.random.default_rng(0)


def close(got, want, atol=1e-6):
  np.testing.assert_allclose(
    np.asarray(got, np.float64), want, rtol=1e-5, atol=atol
  )


def f32(x):
  return np.asarray(x, np.float32)


def f64(x):
  return np.asarray(x, np.float64)


def logsig(x):
  return -np.logaddexp(0.0, -x)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def right_padded_mask(lengths, t):
  """[B, T] float mask: row i has its first lengths[i] positions on."""
  return f32(np.arange(t)[None, :] < np.asarray(lengths)[:, None])


# ------------------------------------------------------------ numpy references


def np_preference(pc, pr, rc, rr, nc, nr, loss_type, beta, ls, gamma, rpo, lam):
  """DPO-family losses as the papers / TRL's DPOTrainer write them."""
  pc, pr, rc, rr, nc, nr = map(f64, (pc, pr, rc, rr, nc, nr))
  nll = -pc / nc  # RPO: chosen NLL per token
  if loss_type in ("ipo", "simpo", "orpo"):  # per-token averages
    pc, pr = pc / nc, pr / nr
  if loss_type == "ipo":
    rc, rr = rc / nc, rr / nr
  ref_free = loss_type in ("simpo", "orpo")
  pi_logratios = pc - pr
  ref_logratios = 0.0 if ref_free else rc - rr
  h = pi_logratios - ref_logratios
  if loss_type == "sigmoid":
    loss = -logsig(beta * h) * (1 - ls) - logsig(-beta * h) * ls
  elif loss_type == "robust":
    loss = (-logsig(beta * h) * (1 - ls) + logsig(-beta * h) * ls) / (
      1 - 2 * ls
    )
  elif loss_type == "ipo":
    loss = (h - 1 / (2 * beta)) ** 2
  elif loss_type == "hinge":
    loss = np.maximum(0.0, 1 - beta * h)
  elif loss_type == "dpop":
    penalty = np.maximum(0.0, rc - pc)
    z = beta * (h - lam * penalty)
    loss = -logsig(z) * (1 - ls) - logsig(-z) * ls
  elif loss_type == "simpo":
    z = beta * h - gamma
    loss = -logsig(z) * (1 - ls) - logsig(-z) * ls
  elif loss_type == "orpo":
    # log odds(p) = log p - log(1 - p), with p = exp(mean log-prob)
    def log_odds(lp):
      return lp - np.log(1 - np.exp(lp))

    loss = -pc - beta * logsig(log_odds(pc) - log_odds(pr))
  loss = loss + rpo * nll
  if ref_free:
    return loss, beta * pc, beta * pr
  return loss, beta * (pc - rc), beta * (pr - rr)


def np_log_softmax(logits):
  x = f64(logits)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_whiten(x, mask, shift_mean):
  """TRL's masked_whiten: masked mean, Bessel-corrected masked variance."""
  x, m = f64(x), f64(mask)
  mean = (x * m).sum() / m.sum()
  var = (((x - mean) ** 2) * m).sum() / m.sum()
  var = var * m.sum() / (m.sum() - 1)
  out = (x - mean) / np.sqrt(var + 1e-8)
  return out if shift_mean else out + mean


def np_gae(rewards, values, mask, gamma, lam):
  """Right to left over each row's masked positions only."""
  r, v = f64(rewards), f64(values)
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    next_value, next_adv = 0.0, 0.0
    for t in reversed(np.flatnonzero(mask[b] > 0)):
      delta = r[b, t] + gamma * next_value - v[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_value = v[b, t]
      adv[b, t] = next_adv
  return adv, adv + v


def np_ppo_policy(logp, old, adv, mask, clip):
  logp, old, adv, m = map(f64, (logp, old, adv, mask))
  ratio = np.exp(logp - old)
  pg_losses = -adv * ratio
  pg_losses2 = -adv * np.clip(ratio, 1 - clip, 1 + clip)
  loss = (np.maximum(pg_losses, pg_losses2) * m).sum()
  clipfrac = ((pg_losses2 > pg_losses) * m).sum()
  approxkl = (0.5 * (logp - old) ** 2 * m).sum()
  return loss, m.sum(), clipfrac, approxkl


def np_ppo_value(v, old, ret, mask, clip):
  v, old, ret, m = map(f64, (v, old, ret, mask))
  vpredclipped = np.clip(v, old - clip, old + clip)
  vf_losses1 = (v - ret) ** 2
  vf_losses2 = (vpredclipped - ret) ** 2
  loss = 0.5 * (np.maximum(vf_losses1, vf_losses2) * m).sum()
  return loss, m.sum(), ((vf_losses2 > vf_losses1) * m).sum()


def np_group_advantages(rewards, g, scale):
  r = f64(rewards)
  out = np.empty_like(r)
  for start in range(0, len(r), g):
    grp = r[start : start + g]
    a = grp - grp.mean()
    if scale:
      std = grp.std(ddof=1) if g > 1 else 0.0  # torch.std: unbiased
      a = a / (std + 1e-4)
    out[start : start + g] = a
  return out


def np_grpo(logp, old, ref, adv, mask, eps_low, eps_high, beta, agg, max_len):
  """TRL GRPOTrainer._compute_loss, token by token."""
  logp, old, ref, adv, m = map(f64, (logp, old, ref, adv, mask))
  b_rows, t_len = logp.shape
  row_sums, row_counts = np.zeros(b_rows), np.zeros(b_rows)
  kl_sum = low = high = 0.0
  for b in range(b_rows):
    for t in range(t_len):
      if m[b, t] == 0:
        continue
      ratio = math.exp(logp[b, t] - old[b, t])
      clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
      loss = -min(ratio * adv[b], clipped * adv[b])
      if beta:
        d = ref[b, t] - logp[b, t]
        kl = math.exp(d) - d - 1
        loss += beta * kl
        kl_sum += kl
      low += ratio < 1 - eps_low and adv[b] < 0
      high += ratio > 1 + eps_high and adv[b] > 0
      row_sums[b] += loss
      row_counts[b] += 1
  seqs = (row_counts > 0).sum()
  if agg == "grpo":
    loss = (row_sums / np.maximum(row_counts, 1)).sum() / seqs
  elif agg == "dr_grpo":
    loss = row_sums.sum() / (seqs * max_len)
  else:
    loss = row_sums.sum() / row_counts.sum()
  return loss, kl_sum, low, high, m.sum()


def np_kto(policy, ref, labels, kl, beta, wd, wu, loss_type):
  out, chosen_r, rejected_r = [], [], []
  for p, r, y in zip(f64(policy), f64(ref), labels, strict=True):
    logratio = p - r
    if loss_type == "kto":
      if y:
        loss = wd * (1 - sigmoid(beta * (logratio - kl)))
      else:
        loss = wu * (1 - sigmoid(beta * (kl - logratio)))
    else:  # apo_zero_unpaired
      loss = (
        wd * (1 - sigmoid(beta * logratio))
        if y
        else wu * sigmoid(beta * logratio)
      )
    out.append(loss)
    chosen_r.append(beta * logratio if y else 0.0)
    rejected_r.append(0.0 if y else beta * logratio)
  return np.array(out), np.array(chosen_r), np.array(rejected_r)


# ------------------------------------------ random inputs, with and without jit

P = 16
PREF = dict(
  pc=f32(-RNG.uniform(0.5, 20, P)),
  pr=f32(-RNG.uniform(0.5, 20, P)),
  rc=f32(-RNG.uniform(0.5, 20, P)),
  rr=f32(-RNG.uniform(0.5, 20, P)),
  nc=f32(RNG.integers(1, 10, P)),
  nr=f32(RNG.integers(1, 10, P)),
)
B, T, V = 4, 7, 11
# Padding of every kind: right, left, a gap, a full row, an empty row.
MASK = f32(
  [
    [1, 1, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 1],
    [1, 1, 0, 0, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1],
  ]
)
MASK_EMPTY_ROW = np.concatenate([MASK, np.zeros((1, T), np.float32)])


class PreferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    ("sigmoid", 0.1, {}),
    ("sigmoid", 2.0, {"label_smoothing": 0.2}),
    ("robust", 0.5, {"label_smoothing": 0.2}),
    ("ipo", 0.1, {}),
    ("ipo", 2.0, {}),
    ("hinge", 0.5, {}),
    ("dpop", 0.5, {"dpop_lambda": 5.0, "label_smoothing": 0.1}),
    ("simpo", 2.0, {"simpo_gamma": 0.7}),
    ("orpo", 0.1, {}),
    ("orpo", 2.0, {}),
    ("sigmoid", 0.5, {"rpo_alpha": 0.5}),
  )
  def test_matches_numpy(self, loss_type, beta, kw):
    fn = functools.partial(
      losses.preference_loss, loss_type=loss_type, beta=beta, **kw
    )
    got = self.variant(fn)(*PREF.values())
    want = np_preference(
      *PREF.values(),
      loss_type,
      beta,
      kw.get("label_smoothing", 0.0),
      kw.get("simpo_gamma", 0.5),
      kw.get("rpo_alpha", 0.0),
      kw.get("dpop_lambda", 50.0),
    )
    for g, w in zip(got, want, strict=True):
      close(g, w, atol=1e-5)


class TokenTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1.0, 8.0)
  def test_logps_entropy_and_sums(self, scale):
    logits = f32(RNG.normal(size=(B, T, V)) * scale)
    targets = RNG.integers(0, V, (B, T))
    logp = np_log_softmax(logits)
    want_tok = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want_ent = -(np.exp(logp) * logp).sum(-1)
    close(self.variant(losses.token_logps)(logits, targets), want_tok, 1e-5)
    close(self.variant(losses.token_entropy)(logits), want_ent, 1e-5)
    sums, counts = self.variant(losses.sequence_logps)(logits, targets, MASK)
    close(sums, (want_tok * MASK).sum(-1), 1e-5)
    close(counts, MASK.sum(-1))

  def test_bfloat16_logits_give_float32(self):
    logp, ent = jax.jit(
      lambda x, t: (losses.token_logps(x, t), losses.token_entropy(x))
    )(jnp.zeros((1, 2, V), jnp.bfloat16), jnp.zeros((1, 2), jnp.int32))
    assert logp.dtype == ent.dtype == jnp.float32
    # uniform logits: log p = -log V, entropy = log V
    close(logp, -math.log(V))
    close(ent, math.log(V))


class RewardKLTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((False, 0.0), (True, 0.01))
  def test_bradley_terry(self, with_margin, center):
    rc, rr = f32(RNG.normal(size=P) * 3), f32(RNG.normal(size=P) * 3)
    margin = f32(RNG.uniform(0, 2, P)) if with_margin else None
    fn = functools.partial(losses.bradley_terry, center_coef=center)
    got = self.variant(fn)(rc, rr, margin)
    z = f64(rc) - f64(rr) - (0.0 if margin is None else f64(margin))
    want = np.log1p(np.exp(-z)) + center * (f64(rc) + f64(rr)) ** 2
    close(got, want)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("k1", "k2", "k3")
  def test_kl_estimate(self, kind):
    logp = f32(-RNG.uniform(0.1, 5, (B, T)))
    ref = f32(logp + RNG.normal(size=(B, T)) * 0.5)
    got = self.variant(functools.partial(losses.kl_estimate, kind=kind))(
      logp, ref
    )
    log_ratio = f64(logp) - f64(ref)  # log pi/pi_ref at the sampled token
    want = {
      "k1": log_ratio,
      "k2": log_ratio**2 / 2,
      "k3": (1 / np.exp(log_ratio) - 1) + log_ratio,  # (r - 1) - log r
    }[kind]
    close(got, want)


class AdvantageTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_whiten(self, shift_mean):
    x = f32(RNG.normal(size=(B, T)) * 3 + 1)
    fn = functools.partial(losses.whiten, shift_mean=shift_mean)
    close(self.variant(fn)(x, MASK), np_whiten(x, MASK, shift_mean), 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((1.0, 1.0), (0.99, 0.95), (0.9, 0.0))
  def test_gae(self, gamma, lam):
    r = f32(RNG.normal(size=(B + 1, T)))
    v = f32(RNG.normal(size=(B + 1, T)))
    fn = functools.partial(losses.gae, gamma=gamma, lam=lam)
    adv, ret = self.variant(fn)(r, v, MASK_EMPTY_ROW)
    want_adv, want_ret = np_gae(r, v, MASK_EMPTY_ROW, gamma, lam)
    close(adv, want_adv, 1e-5)
    close(ret, want_ret, 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.2, 0.05)
  def test_ppo_policy_loss(self, clip):
    old = f32(-RNG.uniform(0.1, 5, (B, T)))
    logp = f32(old + RNG.normal(size=(B, T)) * 0.3)
    adv = f32(RNG.normal(size=(B, T)))
    fn = functools.partial(losses.ppo_policy_loss, clip=clip)
    loss, count, mets = self.variant(fn)(logp, old, adv, MASK)
    want = np_ppo_policy(logp, old, adv, MASK, clip)
    got = (loss, count, mets["clipfrac_sum"], mets["approxkl_sum"])
    for g, w in zip(got, want, strict=True):
      close(g, w, 1e-5)
    assert 0 < want[2] < want[1]  # some tokens clipped, not all

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.2, 1.0)
  def test_ppo_value_loss(self, clip):
    old = f32(RNG.normal(size=(B, T)))
    v = f32(old + RNG.normal(size=(B, T)) * 0.5)
    ret = f32(RNG.normal(size=(B, T)))
    fn = functools.partial(losses.ppo_value_loss, clip=clip)
    got = self.variant(fn)(v, old, ret, MASK)
    for g, w in zip(got, np_ppo_value(v, old, ret, MASK, clip), strict=True):
      close(g, w, 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((4, True), (4, False), (2, True), (1, True))
  def test_group_advantages(self, g, scale):
    r = f32(RNG.normal(size=8))
    fn = functools.partial(losses.group_advantages, group_size=g, scale=scale)
    close(self.variant(fn)(r), np_group_advantages(r, g, scale), 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_leave_one_out_by_hand(self):
    # Groups of 3: [1, 2, 6] -> 1 - 4, 2 - 3.5, 6 - 1.5; [0, 0, 3] -> ...
    r = f32([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    want = [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    fn = functools.partial(losses.leave_one_out, group_size=3)
    close(self.variant(fn)(r), want, 1e-6)
    fn1 = functools.partial(losses.leave_one_out, group_size=1)
    close(self.variant(fn1)(r), r, 0)  # one sample: nothing to subtract
    with self.assertRaises(ValueError):
      losses.leave_one_out(r, 4)


class GRPOTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    ("grpo", 0.0, 0.2, 0.2, None),
    ("grpo", 0.04, 0.2, 0.28, None),
    ("dr_grpo", 0.0, 0.2, 0.2, 12),
    ("dr_grpo", 0.04, 0.1, 0.3, None),
    ("dapo", 0.0, 0.2, 0.28, None),
    ("dapo", 0.1, 0.2, 0.2, None),
  )
  def test_matches_numpy(self, agg, beta, eps_low, eps_high, max_len):
    old = f32(-RNG.uniform(0.1, 5, (B, T)))
    logp = f32(old + RNG.normal(size=(B, T)) * 0.3)
    ref = f32(logp + RNG.normal(size=(B, T)) * 0.3)
    adv = f32(RNG.normal(size=B))
    fn = functools.partial(
      losses.grpo_loss,
      eps_low=eps_low,
      eps_high=eps_high,
      beta=beta,
      agg=agg,
      max_completion_length=max_len,
    )
    loss, mets = self.variant(fn)(logp, old, ref, adv, MASK)
    want, kl, low, high, n = np_grpo(
      logp, old, ref, adv, MASK, eps_low, eps_high, beta, agg, max_len or T
    )
    close(loss, want)
    close(mets["loss"][0] / mets["loss"][1], want)
    if beta:
      close(mets["kl"][0], kl, 1e-5)
      close(mets["kl"][1], n)
    else:
      assert "kl" not in mets
    chex.assert_trees_all_close(
      (mets["clip_ratio/low_mean"], mets["clip_ratio/high_mean"]),
      ((low, n), (high, n)),
    )
    close(mets["clip_ratio/region_mean"][0], low + high)
    assert low + high > 0

  @parameterized.parameters("grpo", "dr_grpo", "dapo")
  def test_micro_batches_sum_to_whole_batch(self, agg):
    # rows split 2 + 3 (unequal), one row empty: sum the (loss_sum, weight)
    # pairs and divide once, as jft/steps.py does across micro-batches.
    bb = B + 1
    old = f32(-RNG.uniform(0.1, 5, (bb, T)))
    logp = f32(old + RNG.normal(size=(bb, T)) * 0.3)
    ref = f32(logp + RNG.normal(size=(bb, T)) * 0.3)
    adv = f32(RNG.normal(size=bb))
    fn = functools.partial(
      losses.grpo_loss, eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg
    )
    args = (logp, old, ref, adv, MASK_EMPTY_ROW)
    whole, mets = fn(*args)
    parts = [fn(*(a[s] for a in args))[1] for s in (slice(0, 2), slice(2, bb))]
    summed = jax.tree.map(lambda a, b: a + b, *parts)
    close(summed["loss"][0] / summed["loss"][1], float(whole))
    chex.assert_trees_all_close(summed, mets, rtol=1e-5, atol=1e-6)
    want = np_grpo(*args, 0.2, 0.28, 0.04, agg, T)[0]
    close(whole, want)


class KTOTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    ("kto", 0.1, 0.3, 1.0, 1.0),
    ("kto", 1.0, 0.0, 1.33, 0.7),
    ("apo_zero_unpaired", 0.5, 0.3, 1.0, 2.0),
  )
  def test_matches_numpy(self, loss_type, beta, kl, wd, wu):
    policy = f32(-RNG.uniform(1, 20, P))
    ref = f32(policy + RNG.normal(size=P) * 2)
    labels = f32(RNG.integers(0, 2, P))
    fn = functools.partial(
      losses.kto_loss,
      beta=beta,
      desirable_weight=wd,
      undesirable_weight=wu,
      loss_type=loss_type,
    )
    got = self.variant(fn)(policy, ref, labels, f32(kl))
    want = np_kto(policy, ref, labels > 0, kl, beta, wd, wu, loss_type)
    for g, w in zip(got, want, strict=True):
      close(g, w)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.5)
  def test_kl_estimate(self, shift):
    p = f32(-RNG.uniform(1, 20, 8))
    r = f32(p - shift + RNG.normal(size=8) * 0.1)
    w = f32([1, 1, 1, 1, 1, 1, 0, 0])
    got = self.variant(losses.kto_kl_estimate)(p, r)
    close(got, max((f64(p) - f64(r)).mean(), 0.0))
    got_w = self.variant(functools.partial(losses.kto_kl_estimate, weights=w))(
      p, r
    )
    close(got_w, max((f64(p) - f64(r))[:6].mean(), 0.0))


# ----------------------------------------------------------------- by hand


def test_preference_loss_moved_from_dpo():
  assert dpo.preference_loss is losses.preference_loss
  assert dpo.sequence_logps is losses.sequence_logps
  assert dpo.LOSS_TYPES is losses.LOSS_TYPES


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "orpo"])
def test_label_smoothing_without_a_smoothing_term_is_an_error(loss_type):
  with pytest.raises(ValueError, match=r"config\.dpo\.label_smoothing"):
    losses.preference_loss(
      *PREF.values(), loss_type=loss_type, beta=0.1, label_smoothing=0.1
    )
  losses.preference_loss(*PREF.values(), loss_type=loss_type, beta=0.1)


def test_orpo_with_rpo_alpha_is_an_error():
  # ORPO's loss already is NLL(chosen) + odds term; RPO would add it twice.
  with pytest.raises(ValueError, match=r"config\.dpo\.rpo_alpha"):
    losses.preference_loss(
      *PREF.values(), loss_type="orpo", beta=0.1, rpo_alpha=1.0
    )
  with pytest.raises(ValueError, match=r"config\.dpo\.loss_type"):
    losses.preference_loss(*PREF.values(), loss_type="kto", beta=0.1)


def test_bradley_terry_by_hand():
  # pair 0: rc - rr - margin = 2 - 1 - 1 = 0 -> -log s(0) = log 2
  # pair 1: 0 - 0 - (-1) = 1 -> -log s(1) = log(1 + e^-1) = 0.3132617
  # centering 0.5 * (rc + rr)^2 = 0.5 * [9, 0] = [4.5, 0]
  got = losses.bradley_terry(
    jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0]), jnp.array([1.0, -1.0]), 0.5
  )
  close(got, [math.log(2) + 4.5, 0.3132617], 1e-6)
  # TRL's batch loss: mean(-log s) + 0.5 * mean((rc + rr)^2)
  #                 = (0.693147 + 0.313262) / 2 + 0.5 * 4.5 = 2.753204
  close(jnp.mean(got), 2.753204, 1e-6)


def test_kl_estimates_by_hand():
  # pi = 0.5, pi_ref = 0.25: d = log 2 = 0.693147
  # k1 = 0.693147, k2 = 0.693147^2 / 2 = 0.240227,
  # k3 = pi_ref/pi - 1 - log(pi_ref/pi) = 0.5 - 1 + 0.693147 = 0.193147
  lp, ref = jnp.log(0.5), jnp.log(0.25)
  got = [losses.kl_estimate(lp, ref, k) for k in ("k1", "k2", "k3")]
  close(got, [0.693147, 0.240227, 0.193147], 1e-6)
  close(losses.kl_estimate(lp, lp, "k3"), 0.0)  # identical: exactly 0
  with pytest.raises(ValueError, match="k4"):
    losses.kl_estimate(lp, ref, "k4")


def test_whiten_by_hand():
  # masked [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1) / 2 = 1
  # -> [-1, 0, 1]; the padding 100 -> 98 (callers mask it)
  x, m = jnp.array([1.0, 2.0, 3.0, 100.0]), jnp.array([1.0, 1.0, 1.0, 0.0])
  close(losses.whiten(x, m), [-1, 0, 1, 98], 1e-5)
  close(losses.whiten(x, m, shift_mean=False), [1, 2, 3, 100], 1e-5)
  # one or no masked element: finite, no NaN leaking into masked sums
  for mask in ([0.0, 1.0, 0.0, 0.0], [0.0] * 4):
    assert np.isfinite(losses.whiten(x, jnp.array(mask))).all()


def test_gae_by_hand():
  # gamma = lam = 1: A_t = sum_{k >= t} r_k - V_t (telescoping deltas).
  # rewards [0, 0, 1], values [0.5, 0.25, 0.75]: reward-to-go [1, 1, 1]
  # -> A = [0.5, 0.75, 0.25], returns = A + V = [1, 1, 1].
  # Position 3 is padding (reward 5, value 9 ignored): A = 0, return = 9.
  # Row 1: the same tokens at positions 0, 2, 3, with a gap at 1 (reward 7,
  # value 3 ignored): the recursion carries over it, same A, return 3 there.
  r = jnp.array([[0.0, 0.0, 1.0, 5.0], [0.0, 7.0, 0.0, 1.0]])
  v = jnp.array([[0.5, 0.25, 0.75, 9.0], [0.5, 3.0, 0.25, 0.75]])
  m = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
  adv, ret = losses.gae(r, v, m, gamma=1.0, lam=1.0)
  close(adv, [[0.5, 0.75, 0.25, 0.0], [0.5, 0.0, 0.75, 0.25]])
  close(ret, [[1.0, 1.0, 1.0, 9.0], [1.0, 3.0, 1.0, 1.0]])
  # lam = 0: one-step TD, A_t = r_t + gamma V_{t+1} - V_t, gamma = 0.5:
  # [0 + 0.125 - 0.5, 0 + 0.375 - 0.25, 1 + 0 - 0.75] = [-0.375, 0.125, 0.25]
  adv, _ = losses.gae(r[:1], v[:1], m[:1], gamma=0.5, lam=0.0)
  close(adv, [[-0.375, 0.125, 0.25, 0.0]])


def test_gae_equals_trl_loop_on_right_padding():
  # TRL PPO: every position, padded values and rewards zeroed.
  r, v = f32(RNG.normal(size=(B, T))), f32(RNG.normal(size=(B, T)))
  m = right_padded_mask([3, 7, 1, 5], T)
  r, v = r * m, v * m
  gamma, lam = 0.9, 0.8
  adv_trl = np.zeros((B, T))
  last = np.zeros(B)
  for t in reversed(range(T)):
    nextvalues = v[:, t + 1] if t < T - 1 else 0.0
    delta = r[:, t] + gamma * nextvalues - v[:, t]
    last = delta + gamma * lam * last
    adv_trl[:, t] = last
  adv, ret = losses.gae(r, v, m, gamma, lam)
  close(adv, adv_trl * m, 1e-5)
  close(ret, (adv_trl + v) * m + v * (1 - m), 1e-5)


def test_ppo_losses_by_hand():
  # (ratio, A) per token, clip 0.2:
  #  (1.5,  1): max(-1.5, -1.2) = -1.2, clipped term wins -> clipfrac 1
  #  (1.5, -1): max( 1.5,  1.2) =  1.5
  #  (0.5,  1): max(-0.5, -0.8) = -0.5
  #  (0.5, -1): max( 0.5,  0.8) =  0.8, clipped term wins -> clipfrac 1
  # sum = 0.6; approxkl = 0.5 * 2 * (log(1.5)^2 + log(0.5)^2) = 0.644855
  ratio = jnp.array([[1.5, 1.5, 0.5, 0.5, 3.0]])
  adv = jnp.array([[1.0, -1.0, 1.0, -1.0, 9.0]])
  m = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])  # last token: padding
  loss, n, mets = losses.ppo_policy_loss(
    jnp.log(ratio), jnp.zeros_like(ratio), adv, m, clip=0.2
  )
  close([loss, n, mets["clipfrac_sum"]], [0.6, 4, 2], 1e-6)
  close(mets["approxkl_sum"], 0.644855, 1e-6)
  # value, clip 0.5 (v, old, R): (2, 1, 0): clipped v 1.5; max(4, 2.25) = 4
  # (2, 1, 3): max(1, (1.5 - 3)^2 = 2.25) = 2.25, clipped wins
  # loss = 0.5 * (4 + 2.25) = 3.125
  loss, n, clipfrac = losses.ppo_value_loss(
    jnp.array([2.0, 2.0]),
    jnp.array([1.0, 1.0]),
    jnp.array([0.0, 3.0]),
    jnp.array([1.0, 1.0]),
    clip=0.5,
  )
  close([loss, n, clipfrac], [3.125, 2, 1])


def test_group_advantages_by_hand():
  # group [1, 0, 0, 1]: mean 0.5, deviations +-0.5,
  # unbiased std sqrt((4 * 0.25) / 3) = 0.577350 -> +-0.5 / 0.577450
  # = +-0.865876 (the population std 0.5 would give +-0.9998)
  got = losses.group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 4)
  close(got, [0.865876, -0.865876, -0.865876, 0.865876], 1e-6)
  got = losses.group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 4, False)
  close(got, [0.5, -0.5, -0.5, 0.5])
  # all-equal group: 0 advantage, no division by zero
  close(losses.group_advantages(jnp.array([3.0, 3.0]), 2), [0.0, 0.0])
  with pytest.raises(ValueError, match="groups of 3"):
    losses.group_advantages(jnp.zeros(4), 3)


def test_grpo_aggregations_by_hand():
  # 2 x 3, policy = old (ratio 1, nothing clipped), beta = 0: token loss -A.
  # row 0: A = 1, 3 tokens -> losses [-1, -1, -1], sum -3, mean -1
  # row 1: A = -2, 1 token -> losses [2], sum 2, mean 2
  # grpo    (-1 + 2) / 2 sequences       = 0.5
  # dr_grpo (-3 + 2) / (2 * 3)           = -1/6   (max length 3)
  #         (-3 + 2) / (2 * 4)           = -1/8   (max length 4)
  # dapo    (-3 + 2) / 4 tokens          = -0.25
  logp = jnp.full((2, 3), -1.0)
  adv = jnp.array([1.0, -2.0])
  m = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
  kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0)
  for agg, max_len, want, pair in [
    ("grpo", None, 0.5, (1.0, 2.0)),
    ("dr_grpo", None, -1 / 6, (-1.0, 6.0)),
    ("dr_grpo", 4, -1 / 8, (-1.0, 8.0)),
    ("dapo", None, -0.25, (-1.0, 4.0)),
  ]:
    loss, mets = losses.grpo_loss(
      logp, logp, None, adv, m, agg=agg, max_completion_length=max_len, **kw
    )
    close(loss, want)
    close(mets["loss"], pair)
  # old_logp=None: ratio 1 with the gradient of the ratio, d loss / d logp
  # = -A / n_tokens / sequences for grpo: row 0 -1/6 each, row 1 +1.
  grad = jax.grad(
    lambda lp: losses.grpo_loss(lp, None, None, adv, m, agg="grpo", **kw)[0]
  )(logp)
  close(grad, [[-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0]])
  with pytest.raises(ValueError, match="ref_logp"):
    losses.grpo_loss(logp, logp, None, adv, m, agg="grpo", **kw | {"beta": 1})
  with pytest.raises(ValueError, match="bnpo"):
    losses.grpo_loss(logp, logp, None, adv, m, agg="bnpo", **kw)


def test_kto_by_hand():
  # kl = 0, beta = 0.5, logratios [0, 2, -2], labels [1, 1, 0]:
  # row 0 desirable:   1 - s(0.5 * 0)        = 0.5
  # row 1 desirable:   1 - s(0.5 * 2)        = 1 - s(1) = 0.268941
  # row 2 undesirable: 1 - s(0.5 * (0 + 2))  = 0.268941
  # rewards = 0.5 * logratio: chosen [0, 1, 0], rejected [0, 0, -1]
  policy = jnp.array([-1.0, -1.0, -5.0])
  ref = jnp.array([-1.0, -3.0, -3.0])
  got = losses.kto_loss(
    policy, ref, jnp.array([1.0, 1.0, 0.0]), jnp.float32(0.0), beta=0.5
  )
  close(got[0], [0.5, 0.268941, 0.268941], 1e-6)
  close(got[1], [0.0, 1.0, 0.0])
  close(got[2], [0.0, 0.0, -1.0])
  # the KL reference point: clamped at 0 and without gradient
  close(losses.kto_kl_estimate(policy, ref), 0.0)  # mean (0, 2, -2) = 0
  close(losses.kto_kl_estimate(ref, policy), 0.0)  # still 0, not negative
  close(losses.kto_kl_estimate(jnp.array([1.0, 3.0]), jnp.zeros(2)), 2.0)
  g = jax.grad(lambda p: losses.kto_kl_estimate(p, jnp.zeros(2)))(
    jnp.array([1.0, 3.0])
  )
  close(g, [0.0, 0.0])
  with pytest.raises(ValueError, match="bco"):
    losses.kto_loss(policy, ref, policy, 0.0, beta=0.1, loss_type="bco")


def test_tempered_divides_by_the_sampling_temperature():
  x = jnp.array([[2.0, -1.0, 0.5]])
  np.testing.assert_array_equal(losses.tempered(x, 0.5), x * 2.0)
  assert losses.tempered(x, 1.0) is x and losses.tempered(x, 0) is x
