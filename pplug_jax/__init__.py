"""pplug_jax: Persona-Plug (PPlug, ACL 2025) in JAX/Flax."""

__version__ = '0.1.0'
