"""The published `config.json` of the models configs/lamp.py names, for planning without weights.

The planner (`python -m pplug_jax.aot`) builds the system through the training loader with
abstract weights. When `config.llm.path` / `config.encoder.path` hold no config.json (the
weights are not downloaded yet), the loader reads the model's shape from here instead. Values
are the Hugging Face Hub's config.json files of each repository, keys as there; only what the
loaders read is kept.
"""

from __future__ import annotations

import copy
from typing import Any


def _flan_t5(d_model: int, d_ff: int, num_heads: int, num_layers: int) -> dict[str, Any]:
  return dict(model_type='t5', architectures=['T5ForConditionalGeneration'], vocab_size=32128,
              d_model=d_model, d_kv=64, d_ff=d_ff, num_heads=num_heads, num_layers=num_layers,
              num_decoder_layers=num_layers, feed_forward_proj='gated-gelu',
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0)


def _bert(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
  return dict(model_type='bert', vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, intermediate_size=intermediate, hidden_act='gelu',
              max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
              pad_token_id=0)


LLMS: dict[str, dict[str, Any]] = {
    'google/flan-t5-small': _flan_t5(512, 1024, 6, 8),
    'google/flan-t5-base': _flan_t5(768, 2048, 12, 12),
    'google/flan-t5-large': _flan_t5(1024, 2816, 16, 24),
    'google/flan-t5-xl': _flan_t5(2048, 5120, 32, 24),
    'google/flan-t5-xxl': _flan_t5(4096, 10240, 64, 24),
    'meta-llama/Llama-2-7b-hf': dict(
        model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=32000,
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, hidden_act='silu', max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
        mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    'meta-llama/Llama-3.1-8B': dict(
        model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, hidden_act='silu', max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001),
    'Qwen/Qwen2.5-7B': dict(
        model_type='qwen2', architectures=['Qwen2ForCausalLM'], vocab_size=152064,
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, hidden_act='silu', max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    'Qwen/Qwen3-8B': dict(
        model_type='qwen3', architectures=['Qwen3ForCausalLM'], vocab_size=151936,
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act='silu', max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False, use_sliding_window=False,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
}

ENCODERS: dict[str, dict[str, Any]] = {
    'BAAI/bge-base-en-v1.5': _bert(768, 12, 12, 3072),
    'facebook/contriever': _bert(768, 12, 12, 3072),
    'sentence-transformers/all-MiniLM-L6-v2': _bert(384, 6, 12, 1536),
}


def llm(name: str) -> dict[str, Any] | None:
  """The config.json of a named backbone, or None when it is not one of these."""
  return copy.deepcopy(LLMS.get(name))


def encoder(name: str) -> dict[str, Any] | None:
  """The config.json of a named input encoder, or None."""
  return copy.deepcopy(ENCODERS.get(name))
