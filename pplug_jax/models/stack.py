"""A stack of identical layers, rematerialised and/or scanned as the config says (T5 and decoders)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

REMAT_POLICIES = {
    'full': None,
    'dots_with_no_batch_dims': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'dots': jax.checkpoint_policies.checkpoint_dots,
}


def layer_stack(config: Any, layer_cls: type[nn.Module], num_layers: int,
                in_axes: tuple[Any, ...], **layer_kwargs):
  """Returns fn(x, *args) that applies the layers, remat'ed and/or scanned by config.

  `config` needs `remat_policy` and `scan_layers`; each layer is `layer_cls(config,
  **layer_kwargs)`. Args with in_axes 0 are stacked per layer (a cache), the rest broadcast.
  """
  if config.remat_policy != 'none':
    if config.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'config.llm.remat_policy={config.remat_policy!r} is not one of '
                       f"{['none', *REMAT_POLICIES]}.")
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[config.remat_policy],
                         prevent_cse=not config.scan_layers)
  if config.scan_layers:
    scanned = nn.scan(layer_cls, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=in_axes, length=num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})

    def apply_scanned(x, *args):
      return scanned(config, name='layers', **layer_kwargs)(x, *args)

    return apply_scanned

  def apply_unrolled(x, *args):
    outs = []
    for i in range(num_layers):
      layer_args = [jax.tree.map(lambda a, i=i: a[i], arg) if ax == 0 else arg
                    for arg, ax in zip(args, in_axes)]
      x, out = layer_cls(config, name=f'layers_{i}', **layer_kwargs)(x, *layer_args)
      outs.append(out)
    if outs[0] is None:
      return x, None
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

  return apply_unrolled
