"""Backward-pass dot layouts on the CPU, and a prototype fix (bench only).

What it shows, side by side in one process (medians of interleaved rounds,
so load from other processes hits every variant alike):

1. Dots of the shapes a ref-5M step runs: forward `x @ w`, input grad
   `g @ w.T` and weight grad `x.T @ g`, as autodiff emits them and in
   canonical layout (`[M, K] @ [K, N]`, row-major operands). With XLA:CPU
   (jax 0.10) a weight-grad dot (`lhs_contracting_dims={0}`) is left to
   XLA's own dot emitter instead of the library (YNNPACK) kernels, and a
   bf16 dot with a transposed lhs or a bf16 *output* is upcast to f32.
2. The plain jft train step against the same step with a prototype `Linear`
   (`CanonicalLinear`) whose matmul has a `custom_vjp`: every dot
   accumulates in f32 (`preferred_element_type`) and is cast to the dtype
   autodiff would give; the weight grad's `x.T` is materialised row-major
   by transposing `[M, K, 1] -> [K, M, 1]` (a plain 2-D transpose is kept
   as a layout change and folded back into the dot). Same math as
   autodiff, only the summation order can differ: the run prints the
   gradients' difference (and, for bf16, both variants' error against the
   float32 model's gradients).
   Since then the fix lives in jft (`jft/models/matmul.py`, and the fused
   LM head + log-softmax of `jft/models/head_loss.py`); the step table
   also shows jft's own step, and "jft before" is it with
   `jft.models.matmul.autodiff_reference()` and `logits_chunk=0`.
   bench/fastpath.py measures jft's levers one by one.
3. `--profile`: per-op time of the step before and now from a
   jax.profiler trace, grouped by model component via the HLO op_name
   metadata.

The prototype swaps `jft.models.layers.Linear` for a subclass inside a
context manager, in this process only.

  python bench/matmul_layouts.py [--rounds 15] [--steps 10] [--skip_dots]
  python bench/matmul_layouts.py --profile
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jft import hostmem
from jft.models import layers
from jft.models import matmul as jft_matmul

# ------------------------------------------------------------------------
# The prototype.


def canonical_transpose(a: jax.Array) -> jax.Array:
  """[M, K] -> [K, M] materialised in row-major order.

  `a.T` on its own is lowered as a layout change ({0,1}) that XLA folds
  into the consuming dot (`lhs_contracting_dims={0}`); a rank-3 transpose
  followed by a reshape makes XLA write a canonical copy instead.
  """
  m, k = a.shape
  return jnp.transpose(a[:, :, None], (1, 0, 2)).reshape(k, m)  # [K, M]


def _dot(a, b, out_dtype, transpose_b=False):
  """[M, K] @ [K, N] (or @ b.T for b [N, K]), f32 accumulation, cast.

  A transposed *rhs* is fine for the library kernels; a transposed lhs is
  not (see module docstring), so callers pass canonical lhs operands.
  """
  if a.dtype != b.dtype:  # e.g. f32 cotangent x bf16 kernel: XLA upcasts
    wide = jnp.promote_types(a.dtype, b.dtype)
    a, b = a.astype(wide), b.astype(wide)
  rc = 1 if transpose_b else 0
  y = lax.dot_general(
    a, b, (((1,), (rc,)), ((), ())), preferred_element_type=jnp.float32
  )
  return y.astype(out_dtype)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, canonical-layout VJP."""
  return _dot(x, w, x.dtype)


def matmul_f32_out(x: jax.Array, w: jax.Array) -> jax.Array:
  """As `matmul` but returns float32 (the LM head's logits)."""
  return _matmul_f32(x, w)


@jax.custom_vjp
def _matmul_f32(x, w):
  return _dot(x, w, jnp.float32)


def _fwd(x, w):
  return matmul(x, w), (x, w)


def _fwd_f32(x, w):
  return _matmul_f32(x, w), (x, w)


def _bwd(res, g):
  """dx = g @ w.T, dw = x.T @ g with a row-major x.T: no lhs transpose."""
  x, w = res
  dx = _dot(g, w, x.dtype, transpose_b=True)  # [M, K]
  dw = _dot(canonical_transpose(x), g, w.dtype)  # [K, N]
  return dx, dw


matmul.defvjp(_fwd, _bwd)
_matmul_f32.defvjp(_fwd_f32, _bwd)


class CanonicalLinear(layers.Linear):
  """`layers.Linear` with the custom-VJP matmul; same params and math."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = jnp.dtype(self.out_dtype or self.dtype)
    kernel = self._kernel(x.shape[-1]).astype(self.dtype)  # [in, out]
    x2 = x.astype(self.dtype).reshape(-1, x.shape[-1])  # [M, in]
    if out_dtype == jnp.dtype(self.dtype):
      y = matmul(x2, kernel)  # [M, out]
    elif out_dtype == jnp.float32:
      y = matmul_f32_out(x2, kernel)  # [M, out]
    else:
      raise NotImplementedError(f"out_dtype {out_dtype} with {self.dtype}")
    y = y.reshape(x.shape[:-1] + (self.features,))  # [..., out]
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (self.kernel_axes[1],)
        ),
        (self.features,),
        self.param_dtype,
      )
      y = y + bias.astype(out_dtype)
    return y.astype(out_dtype)


@contextlib.contextmanager
def canonical_linear():
  """Builds models with `CanonicalLinear` while active (this process)."""
  orig = layers.Linear
  layers.Linear = CanonicalLinear
  try:
    yield
  finally:
    layers.Linear = orig


def _onehot_cross_entropy(logits, targets, weights):
  """`base.token_cross_entropy` with the target log-prob picked by a
  one-hot product instead of `take_along_axis`: the same value (the other
  terms are exact zeros), but its gradient is a fused elementwise op rather
  than a zero-filled [B, T, V] buffer plus a scatter."""
  logits = logits.astype(jnp.float32)  # [B, T, V]
  logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  tgt_logp = jnp.sum(logp * onehot, axis=-1)  # [B, T]
  weights = weights.astype(jnp.float32)  # [B, T]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (
    -jnp.sum(tgt_logp * weights),
    jnp.sum(weights),
    jnp.sum(correct * weights),
  )


@contextlib.contextmanager
def onehot_cross_entropy():
  """Objectives use `_onehot_cross_entropy` while active (this process)."""
  from jft.objectives import base

  orig = base.token_cross_entropy
  base.token_cross_entropy = _onehot_cross_entropy
  try:
    yield
  finally:
    base.token_cross_entropy = orig


PLAIN = {"logits_chunk": 0}  # full [B, T, V] logits
# name -> (patches, model overrides). jft itself now has the fix
# (jft/models/matmul.py, jft/models/head_loss.py); `autodiff_reference`
# gives back the plain autodiff step that this prototype was measured on.
STEP_VARIANTS = {
  "autodiff (jft before)": ((jft_matmul.autodiff_reference,), PLAIN),
  "CanonicalLinear (proto)": ((canonical_linear,), PLAIN),
  "CanonicalLinear + one-hot CE (proto)": (
    (canonical_linear, onehot_cross_entropy),
    PLAIN,
  ),
  "jft (matmul.dense + fused head)": ((), {}),
}


# ------------------------------------------------------------------------
# Measurement.


def interleaved_medians(fns: dict, rounds: int) -> dict[str, float]:
  """Median seconds per call; one call of each per round, so that load
  from other processes hits every variant alike."""
  for f in fns.values():
    jax.block_until_ready(f())
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def _dg(a, b, lc, rc, out=jnp.float32):
  return lax.dot_general(
    a, b, (((lc,), (rc,)), ((), ())), preferred_element_type=out
  )


def dot_variants(m, k, n, dtype):
  """name -> (jitted fn, args). The smaller operand is produced inside the
  jit (x2), as in a real step; the 'pre-T' rows get their transposed
  operand materialised outside the jit (PERF.md's reference)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
  w = jnp.asarray(rng.standard_normal((k, n)), dtype)  # [K, N]
  g = jnp.asarray(rng.standard_normal((m, n)), dtype)  # [M, N]
  x_t = jnp.asarray(np.asarray(x).T.copy())  # [K, M]
  w_t = jnp.asarray(np.asarray(w).T.copy())  # [N, K]
  ct = canonical_transpose
  j = jax.jit
  return {
    "fwd x@w": (j(lambda x, w: _dg(2 * x, w, 1, 0)), (x, w)),
    "fwd x@w, out=dtype (jft)": (
      j(lambda x, w: _dg(2 * x, w, 1, 0, dtype)),
      (x, w),
    ),
    "dx g@w.T (autodiff)": (j(lambda g, w: _dg(g, 2 * w, 1, 1)), (g, w)),
    "dx g@ct(w)": (j(lambda g, w: _dg(g, ct(2 * w), 1, 0)), (g, w)),
    "dx g@wT (pre-T)": (j(lambda g, wt: _dg(g, 2 * wt, 1, 0)), (g, w_t)),
    "dW x.T@g (autodiff)": (j(lambda x, g: _dg(2 * x, g, 0, 0)), (x, g)),
    "dW ct(x)@g (proto)": (j(lambda x, g: _dg(ct(2 * x), g, 1, 0)), (x, g)),
    "dW xT@g (pre-T)": (j(lambda xt, g: _dg(2 * xt, g, 1, 0)), (x_t, g)),
  }


def run_dots(rounds: int) -> None:
  shapes = {"LM head": (2048, 256, 4096), "MLP up": (2048, 256, 688)}
  print("== dots (operands made in-jit; GFLOP/s of the dot alone)")
  for label, (m, k, n) in shapes.items():
    for dtype in ("float32", "bfloat16"):
      v = dot_variants(m, k, n, dtype)
      med = interleaved_medians(
        {name: (lambda f=f, a=a: f(*a)) for name, (f, a) in v.items()},
        rounds,
      )
      base = {"fwd": "fwd x@w", "dx": "dx g@w.T (autodiff)"}
      base["dW"] = "dW x.T@g (autodiff)"
      print(f"-- {label} [{m}x{k}]@[{k}x{n}] {dtype}")
      for name, s in med.items():
        ref = med[base[name.split()[0]]]
        gf = 2 * m * k * n / s / 1e9
        print(
          f"  {name:26s} {s * 1e3:7.2f} ms {gf:7.0f} GFLOP/s"
          f"  x{ref / s:4.2f} vs autodiff"
        )


def _global_rel_err(ref, b) -> float:
  """||ref - b|| / ||ref|| over all leaves together."""
  pairs = zip(jax.tree.leaves(ref), jax.tree.leaves(b), strict=True)
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in pairs)
  den = sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(ref))
  return (num / den) ** 0.5


def _max_rel_diff(a, b) -> float:
  """max over leaves of max|a - b| / max|a|."""
  rel = jax.tree.map(
    lambda x, y: jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30), a, b
  )
  return float(max(jax.tree.leaves(rel)))


def _loss_fn(cfg, batch):
  """Mean next-token loss of the params, as the CLM objective computes it."""
  from jft import train
  from jft.models import transformer
  from jft.objectives.clm import CLM

  apply_fn = train.make_apply_fn(transformer.Transformer(cfg))
  objective = CLM(None, tokenizer=None)

  def loss(params):
    s, w, _ = objective.loss(apply_fn, params, batch, None, train=True)
    return s / w

  return loss


def run_steps(dtype: str, steps: int, preset: str, b: int, t: int) -> None:
  tp = _load_throughput()
  variants, grads = {}, {}
  for name, (patches, over) in STEP_VARIANTS.items():
    with contextlib.ExitStack() as stack:
      for patch in patches:  # models are traced (not only built) under it
        stack.enter_context(patch())
      cfg, step_fn, state = tp.build(preset, dtype, "none", overrides=over)
      rng = np.random.default_rng(0)
      data = jax.device_put(tp.random_batch(rng, b, t, cfg.vocab_size))
      # No donation: the same state is fed to every timed call.
      compiled = jax.jit(step_fn).lower(state, data).compile()
      grads[name] = jax.jit(jax.grad(_loss_fn(cfg, data)))(state.params)
    variants[name] = (compiled, state)

  # Numerics from the same state: loss and gradients against the baseline;
  # for bf16 also each variant's error against the float32 model's grads.
  ref = None
  if dtype != "float32":
    ref_cfg = dataclasses.replace(cfg, dtype="float32")
    ref = jax.jit(jax.grad(_loss_fn(ref_cfg, data)))(state.params)
  med = interleaved_medians(
    {k: (lambda c=c, s=s: c(s, data)) for k, (c, s) in variants.items()},
    steps,
  )
  names = list(variants)
  g0 = grads[names[0]]
  print(f"== train step, preset={preset} {dtype} batch={b}x{t}")
  for k in names:
    _, m = variants[k][0](variants[k][1], data)
    line = (
      f"  {k:36s} {med[k] * 1e3:7.1f} ms  x{med[names[0]] / med[k]:4.2f}"
      f"  loss {float(m['train/loss']):.6f}"
      f"  grad diff vs baseline {_max_rel_diff(g0, grads[k]):.1e}"
    )
    if ref is not None:
      line += (
        f"  err vs f32 grads {_max_rel_diff(ref, grads[k]):.1e}"
        f" (global {_global_rel_err(ref, grads[k]):.1e})"
      )
    print(line)


def _load_throughput():
  import importlib.util
  import os

  here = os.path.dirname(os.path.abspath(__file__))
  spec = importlib.util.spec_from_file_location(
    "throughput", os.path.join(here, "throughput.py")
  )
  tp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tp)
  return tp


def _component(op_name: str) -> str:
  """Coarse place in the model of an HLO op, from its JAX op_name."""
  phase = "bwd" if "transpose(" in op_name else "fwd"
  if not op_name:
    return "unnamed (copy/convert)"
  if "jvp(" not in op_name and "transpose(" not in op_name:
    return "optimizer, step"
  for key, part in (
    ("lm_head", "lm_head"),
    ("log_softmax", "loss (CE)"),
    ("_fused", "lm_head + CE (fused)"),
    ("layers/attn/", "attn"),
    ("layers/mlp/", "mlp"),
    ("norm", "norms"),
    ("embed", "embed"),
  ):
    if key in op_name:
      return f"{phase} {part}"
  if "Transformer" not in op_name:  # CE / accuracy outside the model
    return f"{phase} loss (CE)"
  return f"{phase} other"


def run_profile(
  dtype: str, preset: str, b: int, t: int, before: bool, vjps: bool = False
):
  """Per-op time of the train step from a jax.profiler trace (CPU thunks),
  grouped by model component; names map to HLO op_name metadata."""
  import collections
  import glob
  import gzip
  import json
  import re
  import tempfile

  tp = _load_throughput()
  ctx = jft_matmul.autodiff_reference() if before else contextlib.nullcontext()
  with ctx:
    over = PLAIN if before else {}
    if vjps and not before:  # jft's opt-in backward passes
      over = {"attention_vjp": True, "mlp_vjp": True}
    cfg, step_fn, state = tp.build(preset, dtype, "none", overrides=over)
    rng = np.random.default_rng(0)
    data = jax.device_put(tp.random_batch(rng, b, t, cfg.vocab_size))
    compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, data)
    compiled = compiled.compile()
  hlo = compiled.as_text()
  op_names, kinds = {}, {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w-]*)\(", line)
    if m:
      o = re.search(r'op_name="([^"]+)"', line)
      op_names[m.group(1)] = o.group(1) if o else ""
      kind = "ynn" if "__ynn_fusion" in line else m.group(3)
      kinds[m.group(1)] = f"{kind} {m.group(2).split('{')[0]}"
  n = 3
  for _ in range(3):
    state, _ = compiled(state, data)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(n):
        state, _ = compiled(state, data)
      jax.block_until_ready(state)
      wall = (time.perf_counter() - t0) / n
    (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in op_names:
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / n  # ms per step
  total = sum(per_op.values())
  groups = collections.Counter()
  for name, ms in per_op.items():
    groups[_component(op_names[name])] += ms
  label = "autodiff, full logits (before)" if before else "jft (fast paths)"
  if vjps and not before:
    label = "jft (fast paths and the opt-in backward passes)"
  print(
    f"== profile {label}, {preset} {dtype}: {wall * 1e3:.0f} ms/step"
    f" under the profiler; op times summed over threads = {total:.0f} ms"
  )
  for g, ms in groups.most_common():
    print(f"  {g:22s} {ms:7.1f} ms {100 * ms / total:5.1f} %")
  print("  top ops:")
  for name, ms in per_op.most_common(12):
    op = re.sub(
      r"jit\(train_step\)/|while/body/closed_call/", "", op_names[name]
    )
    print(
      f"  {ms:6.1f} ms {100 * ms / total:4.1f} %  {name} [{kinds[name]}]"
      f"  {op[:60]}"
    )


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--preset", default="ref-5M")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--skip_dots", action="store_true")
  p.add_argument("--skip_steps", action="store_true")
  p.add_argument(
    "--profile", action="store_true", help="per-op breakdown of the step"
  )
  p.add_argument(
    "--vjps",
    action="store_true",
    help="with --profile: model.attention_vjp and mlp_vjp on",
  )
  args = p.parse_args(argv)
  print(f"host memory: {hostmem.tune()}")  # as jft.main does
  if args.profile:
    for dtype in ("float32", "bfloat16"):
      for before in (True, False):
        run_profile(dtype, args.preset, args.batch, args.seq, before, args.vjps)
    return
  if not args.skip_dots:
    run_dots(args.rounds)
  if not args.skip_steps:
    for dtype in ("float32", "bfloat16"):
      run_steps(dtype, args.steps, args.preset, args.batch, args.seq)


if __name__ == "__main__":
  main()
