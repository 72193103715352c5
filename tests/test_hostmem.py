"""jft.hostmem: the glibc malloc thresholds train.run sets.

Checked in fresh processes (the settings are process-wide and applied
once): after `tune_malloc()` the heap keeps a freed step's worth of 16 MiB
buffers (glibc's `mallinfo2().arena`) where glibc's defaults return them to
the kernel; a user's own choice is left alone; and a jitted computation
gives bit-identical results either way.
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


def _probe(**env):
  full = {**os.environ, **env}
  for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "JFT_MALLOC"):
    if k not in env:
      full.pop(k, None)
  out = subprocess.run(
    [sys.executable, "-c", PROBE],
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
  }
  assert tuned["kept_mib"] >= 128  # the next step finds its pages mapped
  assert tuned["same"]
  plain = _probe(JFT_MALLOC="default")
  assert plain["applied"] == {"skipped": "JFT_MALLOC=default"}
  assert plain["kept_mib"] < 64  # glibc trims it: page faults again
  assert plain["same"]


@pytest.mark.parametrize(
  "env, reason",
  [
    ({}, None),
    ({"JFT_MALLOC": "default"}, "JFT_MALLOC=default"),
    ({"JFT_MALLOC": "jft"}, None),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=4"}, None),
  ],
)
def test_a_users_own_allocator_choice_is_left_alone(env, reason):
  assert hostmem.user_choice(env) == reason


def test_describe_says_what_was_done():
  assert "32 MiB" in hostmem.describe(
    {"mmap_threshold": 32 << 20, "trim_threshold": 256 << 20}
  )
  assert "glibc malloc defaults (not glibc)" == hostmem.describe(
    {"skipped": "not glibc"}
  )
