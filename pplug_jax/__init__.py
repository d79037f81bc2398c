"""pplug_jax: Persona-Plug (PPlug, ACL 2025) in JAX/Flax."""

import os as _os

# Quiet start-up, set before TensorFlow or transformers load (a user's own setting wins).
# TensorFlow only reads files here, so its oneDNN kernels (and their notice) are not needed;
# transformers' advisory lines ("PyTorch was not found") do not apply: torch is never used.
_os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
_os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

__version__ = '0.1.0'
