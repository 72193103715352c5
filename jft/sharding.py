"""Device mesh, logical-axis rules -> NamedSharding, host batches -> arrays.

Models name parameter axes logically (`embed`, `mlp`, `heads`, `kv`, `vocab`,
`layers`); `config.mesh.rules` maps those names to mesh axes (`data`, `fsdp`,
`tensor`), so the same model code runs on one CPU or a pod.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (one may be -1 = the rest) to a full shape."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n_devices % known:
      raise ValueError(
        f"config.mesh: {n_devices} devices do not divide by the fixed "
        f"axes {sizes}"
      )
    shape[shape.index(-1)] = n_devices // known
  if int(np.prod(shape)) != n_devices:
    sizes = dict(zip(MESH_AXES, shape, strict=True))
    raise ValueError(
      f"config.mesh: axis sizes {sizes} need "
      f"{int(np.prod(shape))} devices, {n_devices} are present"
    )
  return tuple(shape)


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape({a: mesh_cfg[a] for a in MESH_AXES}, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(mesh_cfg) -> tuple[tuple[str, object], ...]:
  """`config.mesh.rules` as (logical, mesh axis or tuple or None) pairs."""
  return tuple((str(k), v) for k, v in mesh_cfg.rules)


def param_shardings(boxed_abstract, mesh: Mesh, rules):
  """NamedShardings for a tree of `nn.Partitioned` (abstract) params."""
  specs = nn.get_partition_spec(boxed_abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over batch axes."""
  return {
    k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.ndim), np.asarray(v)
    )
    for k, v in local.items()
  }
