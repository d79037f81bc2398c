"""The dtype names and activation functions the config and the models share."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Hugging Face names: 'gelu' is the exact (erf) GELU, 'gelu_new' the tanh approximation.
ACTIVATIONS = {
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'relu': jax.nn.relu,
}


def as_dtype(name_or_dtype: Any) -> Any:
  """'bfloat16' -> jnp.bfloat16 (dtypes pass through)."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f'Unknown dtype {name_or_dtype!r}; use one of {sorted(DTYPES)}.')
    return DTYPES[name_or_dtype]
  return name_or_dtype


AUTO = 'auto'


def resolve_dtype(name: str, backend: str | None = None) -> str:
  """A dtype name with 'auto' chosen for the backend: bfloat16 on TPU and GPU (their matmul
  units run it at full rate), float32 on CPU (where bfloat16 is emulated and slower)."""
  if name != AUTO:
    return name
  return 'float32' if (backend or jax.default_backend()) == 'cpu' else 'bfloat16'
