"""Device mesh, logical axis rules and shardings derived from parameter annotations."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as ocp_multihost

from pplug_jax.errors import ConfigError

from pplug_jax.axis_rules import MESH_AXES


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
  """config.mesh_shape with its -1 entry (if any) filled in; a ConfigError if it cannot fit."""
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ConfigError(f'config.mesh_shape={tuple(shape)} needs one entry per axis {axis_names}.')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f'config.mesh_shape={tuple(shape)}: use positive sizes and at most one -1.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f'config.mesh_shape={tuple(shape)} does not divide {num_devices} '
                        'devices.')
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ConfigError(f'config.mesh_shape={tuple(shape)} needs {int(np.prod(shape))} devices; '
                      f'{num_devices} are visible. Set config.mesh_shape, e.g. (-1, 1).')
  return tuple(shape)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `shape` over all devices; one entry may be -1 for 'all remaining devices'."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(shape, len(devices), axis_names)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # CPU / uncommon topologies: plain row-major order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, tuple(axis_names))


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of nn.Partitioned (or plain) abstract arrays."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicated_like(tree: Any, mesh: Mesh) -> Any:
  """A replicated sharding for every leaf (the plug and its optimizer state are small)."""
  return jax.tree.map(lambda _: replicated(mesh), tree)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int,
                   leading: int = 0) -> NamedSharding:
  """Shards dim `leading` the way the 'batch' logical axis is mapped; the rest replicated.

  `leading=1` is a [accum, batch, ...] array of micro-batches: the accumulation axis stays whole.
  """
  axes = (None,) * leading + ('batch',) + (None,) * (ndim - leading - 1)
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, tuple(rules)))


def global_from_host(mesh: Mesh, rules: Sequence[tuple[str, Any]], x: np.ndarray) -> jax.Array:
  """A global batch every process holds in full -> a jax.Array sharded on its batch axis."""
  sharding = batch_sharding(mesh, rules, x.ndim)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def gather_to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array, as numpy, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def maybe_initialize_distributed() -> None:
  """Joins a multi-process JAX job when there is one; a no-op on a single host.

  - `PPLUG_COORDINATOR_ADDRESS`, `PPLUG_NUM_PROCESSES`, `PPLUG_PROCESS_ID`: set by
    scripts/local_multihost.sh (or by hand); CPU processes then use gloo collectives.
  - Multi-host TPU VMs (`TPU_WORKER_HOSTNAMES` names several hosts), `JAX_COORDINATOR_ADDRESS`,
    or SLURM with several tasks: `jax.distributed.initialize()` finds the rest itself.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get('PPLUG_COORDINATOR_ADDRESS'):
    if env.get('JAX_PLATFORMS', '').startswith('cpu'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(env['PPLUG_COORDINATOR_ADDRESS'],
                               int(env.get('PPLUG_NUM_PROCESSES', '1')),
                               int(env.get('PPLUG_PROCESS_ID', '0')))
  elif ((env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0) or
        ('JAX_COORDINATOR_ADDRESS' in env) or
        (int(env.get('SLURM_NTASKS', '1')) > 1)):
    jax.distributed.initialize()
  else:
    return
  logging.info('jax.distributed initialised: process %d of %d', jax.process_index(),
               jax.process_count())


def is_main_process() -> bool:
  """Process 0 writes the files every process shares (config, records metadata, results)."""
  return jax.process_index() == 0


_barrier_passes: dict[str, int] = {}  # name -> how often this process has passed it


def sync(name: str, timeout_s: float = 24 * 3600) -> None:
  """Waits until every process gets to the barrier `name` (a no-op with one process).

  Each call site names its own barrier; the key adds how often this process has passed that
  name, so a barrier passed again (a second trainer, a second job in one process) is a new one,
  and a process that skips or adds one barrier stalls only there.
  A barrier in the coordination service's key-value store, not a device collective: one process
  may be busy for a long time first (precompute, the demo's base model), which a collective
  would time out on (gloo gives up after 30 s).
  """
  if jax.process_count() == 1:
    return
  passes = _barrier_passes[name] = _barrier_passes.get(name, 0) + 1
  key = f'pplug_jax/{name.replace(" ", "_")}/{passes}'
  if not ocp_multihost.is_jax_distributed_client_initialized():  # processes without a service
    multihost_utils.sync_global_devices(key)
    return
  # orbax's public handle on the client jax.distributed.initialize() made
  ocp_multihost.get_jax_distributed_client().wait_at_barrier(key, int(timeout_s * 1000))


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules,
              leading: int = 0) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded on the batch axis (ids dropped).

  `leading=1`: arrays are [accum, batch, ...] micro-batches (the train step's input).
  """
  out = {}
  for k, v in batch.items():
    if v.dtype.kind in 'SUO':
      continue
    sharding = batch_sharding(mesh, rules, v.ndim, leading)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def to_local(x: jax.Array, mesh: jax.sharding.Mesh, rules) -> np.ndarray:
  """A batch-sharded global output -> this process's rows, in its local batch order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  spec = batch_sharding(mesh, rules, x.ndim).spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))
