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
