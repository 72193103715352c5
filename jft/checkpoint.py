"""Orbax checkpoints: train state + data-iterator state, resumable.

Orbax writes each step to a temporary directory and renames it on success,
so a crash mid-save never leaves a half-written step that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jft.state import merge_params, model_params


class _FrozenIterState:
  """Holds an iterator state captured now, for grain's checkpoint handler.

  Capturing before an async save means the saved position is exactly the
  step's, however far the live iterator has moved by the time it is written.
  """

  def __init__(self, state):
    self._state = json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves/restores `{'state': TrainState, 'data': iterator}` by step."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save=True):
    self.directory = checkpoint_dir(workdir)
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

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(
        _FrozenIterState(data_iter.get_state())
      )
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores into `abstract_state`'s shapes, dtypes and shardings."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
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
    raise FileNotFoundError(
      f"config.init: no checkpoints/ directory in {workdir!r}"
    )
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
      raise FileNotFoundError(f"config.init: no checkpoint in {directory!r}")
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
