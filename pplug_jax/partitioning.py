"""Device mesh, logical axis rules and shardings derived from parameter annotations."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'model')

# T5X's standard rules: batch over data, the wide dims over model, embed replicated.
STANDARD_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', 'data'),
    ('vocab', 'model'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('joined_kv', 'model'),
    ('kv', None),
    ('embed', None),
    ('length', None),
    ('relpos_buckets', None),
    ('abspos', None),
    ('token_type', None),
    ('layers', None),
    ('history', None),
    ('plug_in', None),
    ('embed_out', None),
)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `shape` over all devices; one entry may be -1 for 'all remaining devices'."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f'config.mesh_shape={tuple(shape)} needs one entry per axis {axis_names}.')
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh_shape={tuple(shape)}: at most one entry may be -1.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'config.mesh_shape={tuple(shape)} does not divide {len(devices)} devices.')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'config.mesh_shape={tuple(shape)} needs {int(np.prod(shape))} devices; '
                     f'{len(devices)} are visible. Set config.mesh_shape, e.g. (-1, 1).')
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


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int) -> NamedSharding:
  """Shards dim 0 the way the 'batch' logical axis is mapped; the rest replicated."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), tuple(rules))
  return NamedSharding(mesh, spec)


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() on multi-host TPU VMs / clusters; a no-op on one host."""
  multi = (os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0 or
           'JAX_COORDINATOR_ADDRESS' in os.environ or 'SLURM_NTASKS' in os.environ and
           int(os.environ.get('SLURM_NTASKS', '1')) > 1)
  if multi:
    jax.distributed.initialize()
    logging.info('jax.distributed initialised: process %d of %d', jax.process_index(),
                 jax.process_count())
