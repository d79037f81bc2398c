"""The device mesh's axis names and T5X's standard logical axis rules, as plain data.

Kept free of jax so that configs (configs/lamp.py) can name them without loading jax or flax;
`partitioning` builds meshes and shardings from them.
"""

from __future__ import annotations

from typing import Any

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
