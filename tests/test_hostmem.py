"""jft.hostmem: the glibc malloc settings and inline CPU dispatch that
jft.main and train.run set.

Checked in fresh processes (the settings are process-wide and applied
once): after `tune_malloc()` the heap keeps a freed step's worth of 16 MiB
buffers (glibc's `mallinfo2().arena`) where glibc's defaults return them to
the kernel; after `tune()` a jitted computation with a 192 MiB temporary
block page-faults almost nothing on its later calls, where JAX's and glibc's
defaults fault every page of it in again; a user's own choice is left alone;
and a jitted computation gives bit-identical results either way.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest

from jft import hostmem

PROBE = r"""
import ctypes, json, os, sys
import numpy as np

class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in (
    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
    "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def kept_mib():
  # Heap kept by malloc after a step-like cycle: 8 buffers of 16 MiB (after
  # one such buffer, which raises glibc's dynamic thresholds) are allocated
  # and freed; what the heap still holds then.
  warm = np.ones(2 << 20)
  del warm
  bufs = [np.ones(2 << 20) for _ in range(8)]
  del bufs
  return libc.mallinfo2().arena >> 20

import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))
x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
y0 = np.asarray(f(x))
from jft import hostmem
out = {"applied": hostmem.tune_malloc(), "kept_mib": kept_mib()}
out["same"] = bool((np.asarray(f(x)) == y0).all())
print(json.dumps(out))
"""


def _glibc_with_mallinfo2() -> bool:
  try:
    return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
  except OSError:
    return False


FAULTS = r"""
import json, resource
from jft import hostmem
line = hostmem.tune()  # before JAX's CPU client exists, as jft.main does
import jax, jax.numpy as jnp, numpy as np
from jax import lax

@jax.jit
def f(x):  # two 96 MiB temporaries, a small result
  y = lax.optimization_barrier(x * 2.0)
  z = lax.optimization_barrier(jnp.sqrt(y) + 1.0)
  return jnp.sum(z.reshape(-1, 1024), axis=0)

x = jnp.asarray(np.linspace(0, 1, 24 << 20, dtype=np.float32))
want = np.asarray(f(x))
f(x).block_until_ready()
n, before = 5, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(n):
  got = np.asarray(f(x))
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"line": line, "faults": (after - before) / n,
                  "same": bool((got == want).all())}))
"""

_USER_KEYS = (
  "MALLOC_MMAP_THRESHOLD_",
  "MALLOC_TRIM_THRESHOLD_",
  "MALLOC_MMAP_MAX_",
  "JFT_MALLOC",
  "JAX_CPU_ENABLE_ASYNC_DISPATCH",
)


def _probe(code=PROBE, **env):
  full = {**os.environ, **env}
  for k in _USER_KEYS:
    if k not in env:
      full.pop(k, None)
  out = subprocess.run(
    [sys.executable, "-c", code],
    env=full,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_tuned_process_reuses_heap_for_large_buffers_and_numbers_agree():
  tuned = _probe()
  assert tuned["applied"] == {
    "mmap_threshold": hostmem.MMAP_THRESHOLD,
    "trim_threshold": hostmem.TRIM_THRESHOLD,
    "mmap_max": 0,
  }
  assert tuned["kept_mib"] >= 128  # the next step finds its pages mapped
  assert tuned["same"]
  plain = _probe(JFT_MALLOC="default")
  assert plain["applied"] == {"skipped": "JFT_MALLOC=default"}
  assert plain["kept_mib"] < 64  # glibc trims it: page faults again
  assert plain["same"]


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_tuned_step_keeps_its_temporary_block_mapped():
  """96 MiB = 24,576 pages of 4 KiB per temporary: JAX's defaults (async
  dispatch on a worker thread, whose arena maps blocks above 64 MiB) and
  glibc's fault them in on every call; tuned, the block stays in the main
  heap between calls."""
  tuned = _probe(FAULTS)
  assert "no mmap" in tuned["line"] and "inline" in tuned["line"]
  assert tuned["faults"] < 2_000, tuned
  assert tuned["same"]
  plain = _probe(FAULTS, JFT_MALLOC="default")
  assert "glibc malloc defaults" in plain["line"], plain
  assert plain["faults"] > 20_000, plain
  assert plain["same"]


def test_inline_dispatch_leaves_a_user_or_a_started_jax_alone(monkeypatch):
  import jax

  monkeypatch.setattr(hostmem, "_dispatch", None)
  before = jax.config.read("jax_cpu_enable_async_dispatch")
  line = hostmem.inline_cpu_dispatch({"JAX_CPU_ENABLE_ASYNC_DISPATCH": "1"})
  assert "JAX_CPU_ENABLE_ASYNC_DISPATCH" in line
  monkeypatch.setattr(hostmem, "_dispatch", None)
  jax.devices()  # the backend exists now: the setting could not apply
  assert "already initialized" in hostmem.inline_cpu_dispatch({})
  monkeypatch.setattr(hostmem, "_dispatch", None)
  assert "JFT_MALLOC" in hostmem.inline_cpu_dispatch({"JFT_MALLOC": "default"})
  assert jax.config.read("jax_cpu_enable_async_dispatch") == before


@pytest.mark.parametrize(
  "env, reason",
  [
    ({}, None),
    ({"JFT_MALLOC": "default"}, "JFT_MALLOC=default"),
    ({"JFT_MALLOC": "jft"}, None),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_MMAP_MAX_": "65536"}, "MALLOC_MMAP_MAX_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=4"}, None),
  ],
)
def test_a_users_own_allocator_choice_is_left_alone(env, reason):
  assert hostmem.user_choice(env) == reason


def test_describe_says_what_was_done():
  assert "no mmap for large blocks, trim threshold 2048 MiB" in (
    hostmem.describe(
      {
        "mmap_threshold": hostmem.MMAP_THRESHOLD,
        "trim_threshold": hostmem.TRIM_THRESHOLD,
        "mmap_max": 0,
      }
    )
  )
  assert "glibc malloc defaults (not glibc)" == hostmem.describe(
    {"skipped": "not glibc"}
  )
