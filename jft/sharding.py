"""Device mesh, logical-axis rules -> NamedSharding, host batches -> arrays.

Models name parameter axes logically (`embed`, `mlp`, `heads`, `kv`, `vocab`,
`layers`); `config.mesh.rules` maps those names to mesh axes (`data`, `fsdp`,
`tensor`), so the same model code runs on one CPU or a pod.

Rules follow flax's priority semantics: for each parameter dimension the
first rule whose mesh axes are still free in that parameter wins, so
`('batch', ('data', 'fsdp'))` before `('embed', 'fsdp')` leaves a
`('batch', 'length', 'embed')` activation sharded on its batch only.

`validate_rules` turns the ways a rule table goes wrong silently (a typo that
matches nothing, an axis with no rule, a dimension that does not divide by
its mesh axes) into errors that name the rule or the parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical names that only activations use (no parameter carries them), so a
# rule for them never counts as unmatched: `batch` (rows of a batch) and
# `length` (sequence positions).
ACTIVATION_AXES = ("batch", "length")


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (one may be -1 = the rest) to a full shape."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {sizes}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n_devices % known:
      raise ConfigError(
        f"config.mesh: {n_devices} devices do not divide by the fixed "
        f"axes {sizes}"
      )
    shape[shape.index(-1)] = n_devices // known
  if int(np.prod(shape)) != n_devices:
    sizes = dict(zip(MESH_AXES, shape, strict=True))
    raise ConfigError(
      f"config.mesh: axis sizes {sizes} need "
      f"{int(np.prod(shape))} devices, {n_devices} are present"
    )
  return tuple(shape)


def select_devices(num_devices: int = 0) -> list:
  """The devices a run uses: all (0), or the first `num_devices`.

  A subset lets one machine reproduce a smaller run (a 1-device reference
  among 8 fake CPU devices); it is refused in multi-process runs, where every
  process must own part of the mesh.
  """
  devices = jax.devices()
  if not num_devices or num_devices == len(devices):
    return list(devices)
  if jax.process_count() > 1:
    raise ConfigError(
      f"config.mesh.num_devices={num_devices}: a multi-process run uses all "
      f"{len(devices)} devices (set 0)"
    )
  if not 0 < num_devices <= len(devices):
    raise ConfigError(
      f"config.mesh.num_devices={num_devices}, but {len(devices)} devices "
      "are present"
    )
  return list(devices[:num_devices])


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
  """Mesh of `config.mesh` over `devices` (default: `mesh.num_devices`).

  On TPU the device order follows the physical torus (`mesh_utils`); on CPU
  and GPU it is the process-major order of `jax.devices()`.
  """
  if devices is None:
    devices = select_devices(int(mesh_cfg.get("num_devices", 0) or 0))
  devices = list(devices)
  shape = mesh_shape({a: mesh_cfg[a] for a in MESH_AXES}, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(
      shape, devices, allow_split_physical_axes=True
    )
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def rules_from_config(mesh_cfg) -> tuple[tuple[str, object], ...]:
  """`config.mesh.rules` as (logical, mesh axis or tuple or None) pairs."""
  return tuple(
    (str(k), tuple(v) if isinstance(v, list) else v) for k, v in mesh_cfg.rules
  )


def _mesh_axes_of(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, 'x' or ('x', 'y')) as a tuple of names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_specs(boxed_abstract) -> dict[str, tuple]:
  """`{'a/b/kernel': ('embed', 'mlp'), ...}` for a boxed param tree."""
  flat = traverse_util.flatten_dict(
    nn.get_partition_spec(boxed_abstract),
    sep="/",
    is_leaf=lambda _, x: isinstance(x, P),
  )
  return {k: tuple(v) for k, v in flat.items()}


def validate_rules(boxed_abstract, mesh: Mesh, rules) -> None:
  """Checks the rule table against a model's (abstract, boxed) parameters.

  Raises a ConfigError (a ValueError) naming:
    * a rule whose logical name no parameter uses (a typo), unless the name
      is an activation axis (`ACTIVATION_AXES`) or the rule maps to None
      (replicated: harmless, e.g. `layers` when `scan_layers=False`);
    * a rule naming a mesh axis the mesh does not have;
    * a parameter axis name with no rule at all (path and axis);
    * a parameter dimension not divisible by the product of its mesh axes
      (path, dimension, logical name, mesh axes and their sizes).
  """
  specs = logical_specs(boxed_abstract)
  shapes = traverse_util.flatten_dict(nn.unbox(boxed_abstract), sep="/")
  ruled = {name for name, _ in rules}
  used = {n for names in specs.values() for n in names if n is not None}
  for name, target in rules:
    if name in ACTIVATION_AXES or target is None or name in used:
      continue
    raise ConfigError(
      f"config.mesh.rules: rule {(name, target)!r} matches no parameter "
      f"axis; parameter axes are {sorted(used)}"
    )
  for name, target in rules:
    unknown = [a for a in _mesh_axes_of(target) if a not in mesh.shape]
    if unknown:
      raise ConfigError(
        f"config.mesh.rules: rule {(name, target)!r} names mesh axes "
        f"{unknown}; the mesh has {tuple(mesh.shape)}"
      )
  for path, names in sorted(specs.items()):
    for name in names:
      if name is not None and name not in ruled:
        raise ConfigError(
          f"config.mesh.rules: parameter {path} has logical axis {name!r} "
          f"with no rule; add ({name!r}, mesh axes or None)"
        )
    spec = nn.logical_to_mesh_axes(names, rules)
    shape = shapes[path].shape
    for dim, (size, name, entry) in enumerate(
      zip(shape, names, spec, strict=True)
    ):
      axes = _mesh_axes_of(entry)
      n = math.prod(mesh.shape[a] for a in axes)
      if size % n:
        sizes = {a: mesh.shape[a] for a in axes}
        raise ConfigError(
          f"config.mesh: parameter {path} {tuple(shape)} dimension {dim} "
          f"(size {size}, logical {name!r}) does not divide by mesh axes "
          f"{sizes} (product {n})"
        )


def param_shardings(boxed_abstract, mesh: Mesh, rules, *, validate=True):
  """NamedShardings for a tree of `nn.Partitioned` (abstract) params.

  Validates the rules first (see `validate_rules`), so every run that
  shards its parameters gets the named errors.
  """
  if validate:
    validate_rules(boxed_abstract, mesh, rules)
  specs = nn.get_partition_spec(boxed_abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def opt_state_shardings(optimizer, params, mesh: Mesh):
  """Shardings for `optimizer.init(params)`: moments shard as their params.

  `jax.jit(optimizer.init)` alone puts the state on one device (zeros do not
  inherit a sharding), so FSDP would hold a full optimizer copy per device.
  A state leaf shaped like its parameter takes the parameter's sharding;
  anything else (step counts, Adafactor's factored rows/columns) is
  replicated.
  """
  abstract = jax.eval_shape(optimizer.init, params)
  rep = replicated(mesh)

  def like_param(leaf, p):
    if tuple(leaf.shape) == tuple(p.shape) and isinstance(
      p.sharding, NamedSharding
    ):
      return p.sharding
    return rep

  return optax.tree_map_params(
    optimizer,
    like_param,
    abstract,
    params,
    transform_non_params=lambda _: rep,
    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over batch axes.

  Each process passes only its own rows; the global batch is their
  concatenation in process order (rows `B/n * i ...` come from process i).
  """
  return {
    k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.ndim), np.asarray(v)
    )
    for k, v in local.items()
  }


def with_mesh_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
  """`fn` traced under `mesh` and the logical rules.

  Inside, `nn.with_logical_constraint(x, ('batch', 'length', 'embed'))` in
  the model becomes a real sharding constraint; outside such a context it is
  a no-op, which keeps the model usable without a mesh (tests, notebooks).
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with (
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
      nn.logical_axis_rules(rules),
    ):
      return fn(*args, **kwargs)

  return wrapped


def to_host(tree):
  """Numpy copy of a tree of (possibly multi-process) global arrays.

  Every process must call it: with several processes the shards are
  all-gathered, since no process can read another's devices.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def max_over_processes(value: int) -> int:
  """The largest of every process's `value` (each must call it)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def sync(name: str) -> None:
  """Barrier across processes (no-op with one), e.g. after process 0 writes
  files the others read."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
