"""jft.data.refcache: the on-disk cache of precomputed reference log-probs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jft import sharding
from jft.data import refcache


def _params():
  rng = np.random.default_rng(0)
  return {
    "embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
    "layer": {
      "kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16),
      "codes": jnp.asarray(rng.integers(0, 255, (8, 4)), jnp.uint8),
    },
  }


def test_params_fingerprint_ignores_sharding_and_sees_one_ulp():
  p = _params()
  base = refcache.params_fingerprint(p)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  spread = dict(p)
  spread["embed"] = jax.device_put(
    p["embed"], NamedSharding(mesh, PartitionSpec("fsdp", None))
  )
  assert len(spread["embed"].sharding.device_set) == jax.device_count()
  assert refcache.params_fingerprint(spread) == base
  for path in (("embed",), ("layer", "kernel"), ("layer", "codes")):
    q = jax.tree.map(lambda x: x, p)
    leaf = q
    for k in path[:-1]:
      leaf = leaf[k]
    x = np.array(leaf[path[-1]])
    flat = x.reshape(-1)
    if x.dtype == np.uint8:
      flat[5] ^= 1
    else:  # the next float up: one ulp
      flat[5] = np.nextafter(flat[5], np.float32(np.inf)).astype(x.dtype)
      if flat[5] == np.array(leaf[path[-1]]).reshape(-1)[5]:  # bf16: bits
        flat.view(np.uint16)[5] += 1
    leaf[path[-1]] = jnp.asarray(x)
    assert refcache.params_fingerprint(q) != base, path
  # swapping two values keeps the plain sum but not the fingerprint
  q = dict(p)
  e = np.array(p["embed"])
  e[[0, 1]] = e[[1, 0]]
  q["embed"] = jnp.asarray(e)
  assert refcache.params_fingerprint(q) != base


class _Objective:
  """Stands for DPO in 'precomputed' mode: adds `ref_c` to each example."""

  name = "dpo"
  precomputed_fields = ("ref_c",)

  def __init__(self):
    self.calls = 0

  def precompute(self, examples, apply_fn, params, run_batches):
    del apply_fn, run_batches
    self.calls += 1
    shift = float(np.asarray(params["embed"]).sum())
    out = []
    for ex in examples:
      ref = ex["ref_c"].copy()
      ref[0] = ex["inputs"].sum() + shift
      out.append({**ex, "ref_c": ref})
    return out


def _examples(n=5, seed=0):
  """Rows of differing lengths, `ref_c` as long as the row (as DPO's)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    t = 3 + (i * 3) % 7
    out.append(
      {
        "inputs": rng.integers(0, 50, t).astype(np.int32),
        "ref_c": np.zeros(t, np.float32),
      }
    )
  return out


def _run(obj, examples, params, cache_dir, said):
  return refcache.precompute(
    obj,
    examples,
    None,
    params,
    None,
    cache_dir=str(cache_dir),
    model_config={"dtype": "float32"},
    split="train",
    say=said.append,
  )


def _values(examples):
  return [float(ex["ref_c"][0]) for ex in examples]


def test_precompute_is_cached_and_keyed(tmp_path):
  obj, p, ex, said = _Objective(), _params(), _examples(), []
  first = _run(obj, ex, p, tmp_path, said)
  assert obj.calls == 1 and "cached in" in said[-1]
  files = os.listdir(tmp_path / "ref_logps")
  assert len(files) == 1 and files[0].endswith(".npz")
  again = _run(obj, ex, p, tmp_path, said)
  assert obj.calls == 1 and "from" in said[-1]
  assert _values(again) == _values(first)
  assert all(a["ref_c"].dtype == np.float32 for a in again)
  # other data, other params, another model config: computed afresh
  _run(obj, _examples(seed=1), p, tmp_path, said)
  assert obj.calls == 2
  q = {**p, "embed": p["embed"] * 2}
  assert _values(_run(obj, ex, q, tmp_path, said)) != _values(first)
  assert obj.calls == 3
  refcache.precompute(
    obj,
    ex,
    None,
    p,
    None,
    cache_dir=str(tmp_path),
    model_config={"dtype": "bfloat16"},
    split="train",
    say=said.append,
  )
  assert obj.calls == 4


@pytest.mark.parametrize("damage", ["truncate", "other_key", "short"])
def test_a_damaged_cache_file_is_never_used(tmp_path, damage):
  obj, p, ex, said = _Objective(), _params(), _examples(), []
  want = _values(_run(obj, ex, p, tmp_path, said))
  (name,) = os.listdir(tmp_path / "ref_logps")
  path = tmp_path / "ref_logps" / name
  if damage == "truncate":  # a write cut short
    path.write_bytes(path.read_bytes()[:40])
  elif damage == "other_key":  # another run's numbers under this name
    np.savez(path, key=np.asarray("0" * 32), ref_c=np.ones(5, np.float32))
  else:  # fewer rows than examples
    key = name.removesuffix(".npz")
    with open(path, "wb") as f:
      np.savez(
        f,
        key=np.asarray(key),
        ref_c=np.ones(4, np.float32),
        **{"ref_c.shapes": np.ones((4, 1), np.int64)},
      )
  got = _run(obj, ex, p, tmp_path, said)
  assert obj.calls == 2, "the damaged file was used"
  assert any("ignoring" in s and name in s for s in said)
  assert _values(got) == want
  _run(obj, ex, p, tmp_path, said)  # rewritten whole: used again
  assert obj.calls == 2


def test_objectives_without_precomputed_fields_bypass_the_cache(tmp_path):
  class Plain(_Objective):
    precomputed_fields = ()

  obj, said = Plain(), []
  _run(obj, _examples(), _params(), tmp_path, said)
  _run(obj, _examples(), _params(), tmp_path, said)
  assert obj.calls == 2 and not os.path.exists(tmp_path / "ref_logps")
