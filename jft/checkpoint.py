"""Orbax checkpoints: train state + data-iterator state, resumable.

Orbax writes each step to a temporary directory and renames it on success,
so a crash mid-save never leaves a half-written step that looks finished.
Once a step is committed, process 0 writes a SHA-256 of every file in it
(`_jft_sha256.json`); a restore verifies them, so a truncated or
overwritten file is reported (step and file) and the run falls back to the
previous good step instead of training on poisoned weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jft.errors import CheckpointError, UserError
from jft.state import merge_params, model_params

MANIFEST = "_jft_sha256.json"
QUARANTINE = "corrupt_checkpoints"


class _FrozenIterState:
  """Holds an iterator state captured now, for grain's checkpoint handler.

  Capturing before an async save means the saved position is exactly the
  step's, however far the live iterator has moved by the time it is written.
  """

  def __init__(self, state):
    self._state = json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


class NoCheckpoint(UserError, FileNotFoundError):
  """A run named as a source of weights has no checkpoint."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  """Every file under `step_dir` (relative, sorted), the manifest aside."""
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str) -> None:
  """Records a SHA-256 of every file of a committed step (atomically)."""
  digests = {
    rel: _digest(os.path.join(step_dir, rel)) for rel in _files(step_dir)
  }
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"sha256": digests}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> str | None:
  """None if every file matches its recorded SHA-256, else what is wrong.

  A step without a manifest (saved by an older jft, or killed between the
  commit and the manifest) is 'unverified': the caller decides.
  """
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      digests = json.load(f)["sha256"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{path}: unreadable checksum manifest ({e})"
  for rel, want in sorted(digests.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      return f"{full}: missing"
    if _digest(full) != want:
      return f"{full}: checksum mismatch (corrupt or overwritten)"
  return None


def is_writable(directory: str) -> str | None:
  """None if files can be created in `directory`, else why not.

  Tried for real (not `os.access`): a read-only mount or a folder owned by
  someone else otherwise surfaces as a storage timeout minutes later.
  """
  probe = os.path.join(directory, f".jft_write_probe_{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    return f"{directory}: cannot write there ({e.strerror or e})"
  return None


class Checkpointer:
  """Saves/restores `{'state': TrainState, 'data': iterator}` by step."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save=True):
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    self.primary = jax.process_index() == 0
    if self.primary:
      problem = is_writable(self.directory)
      if problem:
        raise UserError(
          f"{problem}; checkpoints go to WORKDIR/checkpoints (pick a "
          "writable --workdir)"
        )
    self._hasher: threading.Thread | None = None
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
      ),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
      },
    )

  def _checksum_when_committed(self, step: int) -> None:
    """Waits for `step`'s commit in the background, then (process 0)
    records its checksums; training goes on meanwhile."""

    def work():
      self.manager.wait_until_finished()
      step_dir = os.path.join(self.directory, str(step))
      if self.primary and os.path.isdir(step_dir):
        write_manifest(step_dir)

    self._hasher = threading.Thread(target=work, name="jft-checksum")
    self._hasher.start()

  def _join_hasher(self) -> None:
    if self._hasher is not None:
      self._hasher.join()
      self._hasher = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(
        _FrozenIterState(data_iter.get_state())
      )
    self._join_hasher()  # one save in flight at a time
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._checksum_when_committed(step)

  def restore_latest_good(self, abstract_state, data_iter=None, say=print):
    """(step, state) of the newest step that verifies and restores.

    A step that fails is reported with its step and file, moved to
    WORKDIR/corrupt_checkpoints/ (kept, not deleted), and the previous one
    is tried. Raises CheckpointError when steps exist but none is usable;
    returns (0, None) when there are none.
    """
    problems, steps = [], list(reversed(self.all_steps()))
    for i, step in enumerate(steps):
      step_dir = os.path.join(self.directory, str(step))
      problem = verify_step(step_dir)
      if problem is None:
        if not os.path.exists(os.path.join(step_dir, MANIFEST)):
          say(
            f"checkpoint step {step} has no checksums (older jft, or "
            "stopped right after saving it): restoring it unverified"
          )
        try:
          return step, self.restore(step, abstract_state, data_iter)
        except Exception as e:  # noqa: BLE001 (storage errors vary)
          first = (str(e).strip().splitlines() or [""])[0][:300]
          problem = (
            f"{step_dir}: cannot be restored ({type(e).__name__}: {first})"
          )
      problems.append(f"step {step}: {problem}")
      fallback = (
        f"; falling back to step {steps[i + 1]}" if i + 1 < len(steps) else ""
      )
      say(f"checkpoint step {step} is unusable: {problem}{fallback}")
      self._quarantine(step)
    if problems:
      raise CheckpointError(
        f"no usable checkpoint in {self.directory}: "
        + "; ".join(problems)
        + f" (moved to {os.path.join(self.workdir, QUARANTINE)}; remove "
        "the workdir's checkpoints/ to start over)"
      )
    return 0, None

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of orbax's sight, keeping its files."""
    if self.primary:
      dest = os.path.join(
        self.workdir, QUARANTINE, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      )
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"jft_quarantine_{step}")
    self.manager.reload()

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores into `abstract_state`'s shapes, dtypes and shardings."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._join_hasher()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _abstract_from_metadata(tree_meta, mesh):
  """ShapeDtypeStructs (replicated on `mesh`) from saved array metadata."""
  sharding = NamedSharding(mesh, P())

  def leaf(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

  return jax.tree.map(leaf, tree_meta, is_leaf=lambda x: hasattr(x, "shape"))


@contextlib.contextmanager
def _quiet_absl():
  """Hides orbax's expected warnings for a read-only, params-only restore
  (read-only directory, the data item left unrestored)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def latest_step(workdir: str) -> int | None:
  """The newest saved step of the run in `workdir` (None: none), read
  without opening it for writing (a stage cache may be read-only)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return None
  with (
    _quiet_absl(),
    ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    ) as mngr,
  ):
    return mngr.latest_step()


def load_params(
  workdir: str,
  mesh,
  step: int | None = None,
  parts=("trainable", "frozen"),
  aux: bool = False,
) -> dict:
  """Full parameter tree (trainable + frozen) of another jft run.

  Used by `config.init` to start SFT/DPO from a pretraining run. Arrays come
  back as host numpy; the caller places them with its own shardings.
  `parts=('ref',)` reads the stored reference instead. Models trained
  alongside (PPO's critic, `state.AUX_KEYS`) are left out unless `aux`.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise NoCheckpoint(f"{workdir}: no checkpoints/ directory (not a jft run)")
  with (
    _quiet_absl(),
    ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    ) as mngr,
  ):
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise NoCheckpoint(f"{directory}: no checkpoint in it")
    problem = verify_step(os.path.join(directory, str(step)))
    if problem:
      raise CheckpointError(f"{workdir}, step {step}: {problem}")
    meta = mngr.item_metadata(step)["state"]
    meta = meta.tree if hasattr(meta, "tree") else meta
    sub = {k: meta[k] for k in parts}
    abstract = _abstract_from_metadata(sub, mesh)
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=abstract,
          restore_args=jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(
              sharding=a.sharding, global_shape=a.shape, dtype=a.dtype
            ),
            abstract,
          ),
          partial_restore=True,
        )
      ),
    )["state"]
  params = merge_params(*(restored[k] for k in parts))
  if not aux:
    params = model_params(params)
  return jax.tree.map(np.asarray, params)
