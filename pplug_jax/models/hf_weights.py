"""Hugging Face safetensors directories -> Flax param trees, placed tensor by tensor.

Safetensors files are memory-mapped (the format is a JSON header plus raw little-endian data),
so a tensor is read only when it is placed, and with shardings each device reads only its own
slice: an 11B model is never held twice in host memory. bf16 is read through ml_dtypes,
which the `safetensors` numpy backend cannot do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from pplug_jax import storage
from pplug_jax import fileio
from pplug_jax.errors import UserError
from pplug_jax.models import bert as bert_lib
from pplug_jax.models import decoder as decoder_lib
from pplug_jax.models import t5 as t5_lib

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Transform:
  """How a Hugging Face tensor becomes ours: on the array, and on its shape alone (checks)."""
  apply: Callable[[np.ndarray], np.ndarray]
  shape: Callable[[tuple[int, ...]], tuple[int, ...]]

_ST_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
_PICKLE_NAMES = ('pytorch_model.bin', 'pytorch_model.bin.index.json', 'model.pt', 'model.ckpt')


class CheckpointError(UserError):
  """A model directory that cannot be loaded; the message says what to do."""


def _conversion_hint(path: str, headless: bool = False) -> str:
  """The one-off command (it needs torch: pip install torch) that writes safetensors.

  headless: `path` has no LM head (saved as T5Model), so the command must read the original
  checkpoint, never `path` itself: from_pretrained would fill the missing head and load silently.
  """
  try:
    model_type = read_hf_config(path).get('model_type')
  except CheckpointError:
    model_type = None
  # T5ForConditionalGeneration keeps FlanT5's own lm_head; AutoModel would drop it.
  cls = 'T5ForConditionalGeneration' if model_type == 't5' or headless else 'AutoModel'
  src = 'ORIGINAL' if headless else path
  where = (' (ORIGINAL: the original FlanT5 directory or Hub id, e.g. google/flan-t5-xxl; '
           'never this directory)' if headless else '')
  return (f'Convert once (this needs torch: pip install torch) with: python -c "from transformers '
          f"import {cls}; {cls}.from_pretrained('{src}').save_pretrained('{path}-safetensors')\"{where} "
          'then copy the tokenizer files there too and point the config at it.')


class SafetensorsDir:
  """Read-only view of the tensors of a Hugging Face model directory."""

  def __init__(self, path: str):
    self.path = path
    if not storage.isdir(path):
      raise CheckpointError(f'{path}: not a directory. Point the config at a Hugging Face model '
                            'directory holding config.json and model.safetensors.')
    files = sorted(f for f in storage.listdir(path) if f.endswith('.safetensors'))
    index = os.path.join(path, 'model.safetensors.index.json')
    if not files:
      pickles = [f for f in storage.listdir(path) if f in _PICKLE_NAMES or f.endswith('.bin')]
      if pickles:
        raise CheckpointError(f'{path}: only pickle checkpoints ({", ".join(sorted(pickles))}); '
                              'they are refused because unpickling runs arbitrary code. '
                              + _conversion_hint(path))
      raise CheckpointError(f'{path}: no *.safetensors file. Download the model with its '
                            'model.safetensors (or the sharded model-*.safetensors + index).')
    if storage.exists(index):
      with storage.open(index) as f:
        weight_map = json.load(f)['weight_map']
      files = sorted(set(weight_map.values()))
    self._entries: dict[str, tuple[str, dict]] = {}
    for name in files:
      file = os.path.join(path, name)
      if not storage.exists(file):
        raise CheckpointError(f'{index}: names shard {name}, which is missing from {path}.')
      for key, info in _read_header(file).items():
        self._entries[key] = (file, info)

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key][1]['shape'])

  def get(self, key: str) -> np.ndarray:
    """Memory-mapped, read-only numpy view of one tensor."""
    file, info = self._entries[key]
    start, end = info['data_offsets']
    dtype = np.dtype(_ST_DTYPES[info['dtype']])
    shape = tuple(info['shape'])
    if end == start:
      return np.zeros(shape, dtype)
    if storage.is_remote(file):  # a ranged read (no memory map of an object)
      data = storage.read_range(file, info['_base'] + start, end - start)
      return np.frombuffer(data, dtype).reshape(shape)
    return np.memmap(file, dtype=dtype, mode='r', offset=info['_base'] + start, shape=shape)


def _read_header(file: str) -> dict[str, dict]:
  """The tensor table of a safetensors file, checked against the file's size."""
  size = storage.getsize(file)
  try:
    with storage.open(file, 'rb') as f:
      (n,) = struct.unpack('<Q', f.read(8))
      if 8 + n > size:
        raise ValueError(f'header of {n} bytes')
      header = json.loads(f.read(n))
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{file}: not a readable safetensors file (broken header: {e}). '
                          'Re-download it.') from None
  header.pop('__metadata__', None)
  end = 0
  for key, info in header.items():
    if not isinstance(info, dict) or info.get('dtype') not in _ST_DTYPES:
      raise CheckpointError(f'{file}: tensor {key!r} has an unsupported or missing dtype '
                            f'({info.get("dtype") if isinstance(info, dict) else info!r}).')
    info['_base'] = 8 + n
    end = max(end, info['data_offsets'][1])
  if 8 + n + end > size:
    raise CheckpointError(f'{file}: truncated ({size} bytes; its header needs {8 + n + end}). '
                          'Re-download it.')
  return header


def read_hf_config(path: str) -> dict[str, Any]:
  """config.json of a Hugging Face model directory."""
  file = os.path.join(path, 'config.json')
  if not storage.exists(file):
    raise CheckpointError(f'{path}: no config.json. Use a full Hugging Face model directory.')
  try:
    with storage.open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{file}: malformed JSON ({e}). Re-download it.') from None


_T = Transform(lambda a: a.T, lambda s: tuple(reversed(s)))  # torch (out, in) -> Flax (in, out)
_I = Transform(lambda a: a, tuple)


def _t5_mapping(c: t5_lib.T5Config) -> dict[tuple[str, ...], tuple[str, Transform]]:
  m = {('token_embedder', 'embedding'): ('shared.weight', _I)}
  attn = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}
  mlp = ['wi_0', 'wi_1', 'wo'] if c.gated else ['wi', 'wo']

  def block(stack: str, i: int, sub: list[tuple[str, str, str]]):
    for j, (norm, name, hf_name) in enumerate(sub):
      pre = f'{stack}.block.{i}.layer.{j}'
      m[(stack, f'layers_{i}', norm, 'scale')] = (f'{pre}.layer_norm.weight', _I)
      if name == 'mlp':
        for w in mlp:
          m[(stack, f'layers_{i}', 'mlp', w, 'kernel')] = (f'{pre}.DenseReluDense.{w}.weight', _T)
      else:
        for ours, theirs in attn.items():
          m[(stack, f'layers_{i}', name, ours, 'kernel')] = (f'{pre}.{hf_name}.{theirs}.weight',
                                                             _T)

  for i in range(c.num_encoder_layers):
    block('encoder', i, [('pre_attention_layer_norm', 'attention', 'SelfAttention'),
                         ('pre_mlp_layer_norm', 'mlp', '')])
  for i in range(c.num_decoder_layers):
    block('decoder', i, [('pre_self_attention_layer_norm', 'self_attention', 'SelfAttention'),
                         ('pre_cross_attention_layer_norm', 'encoder_decoder_attention',
                          'EncDecAttention'), ('pre_mlp_layer_norm', 'mlp', '')])
  for stack in ('encoder', 'decoder'):
    m[(stack, 'relpos_bias', 'rel_embedding')] = (
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', _T)
    m[(stack, f'{stack}_norm', 'scale')] = (f'{stack}.final_layer_norm.weight', _I)
  if not c.tie_word_embeddings:
    m[('decoder', 'logits_dense', 'kernel')] = ('lm_head.weight', _T)
  return m


_T5_IGNORED = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight',
               'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight')


def _bert_mapping(c: bert_lib.BertConfig,
                  prefix: str) -> dict[tuple[str, ...], tuple[str, Transform]]:
  p = prefix
  m = {
      ('word_embeddings', 'embedding'): (f'{p}embeddings.word_embeddings.weight', _I),
      ('position_embeddings', 'embedding'): (f'{p}embeddings.position_embeddings.weight', _I),
      ('token_type_embeddings', 'embedding'): (f'{p}embeddings.token_type_embeddings.weight', _I),
      ('embeddings_norm', 'scale'): (f'{p}embeddings.LayerNorm.weight', _I),
      ('embeddings_norm', 'bias'): (f'{p}embeddings.LayerNorm.bias', _I),
  }
  parts = {'query': 'attention.self.query', 'key': 'attention.self.key',
           'value': 'attention.self.value', 'attention_out': 'attention.output.dense',
           'wi': 'intermediate.dense', 'wo': 'output.dense'}
  norms = {'attention_norm': 'attention.output.LayerNorm', 'mlp_norm': 'output.LayerNorm'}
  for i in range(c.num_hidden_layers):
    pre = f'{p}encoder.layer.{i}'
    for ours, theirs in parts.items():
      m[(f'layers_{i}', ours, 'kernel')] = (f'{pre}.{theirs}.weight', _T)
      m[(f'layers_{i}', ours, 'bias')] = (f'{pre}.{theirs}.bias', _I)
    for ours, theirs in norms.items():
      m[(f'layers_{i}', ours, 'scale')] = (f'{pre}.{theirs}.weight', _I)
      m[(f'layers_{i}', ours, 'bias')] = (f'{pre}.{theirs}.bias', _I)
  return m


def _is_ignored_bert_key(key: str, prefix: str) -> bool:
  rest = key[len(prefix):] if key.startswith(prefix) else key
  return rest.startswith(('pooler.', 'embeddings.position_ids')) or key.startswith('cls.')


def _stack_scanned(mapping: dict, num_layers: dict[str, int]) -> dict:
  """Groups per-layer entries `stack/layers_i/...` into `stack/layers/...` lists (nn.scan)."""
  out: dict[tuple[str, ...], list] = {}
  for path, entry in mapping.items():
    if len(path) > 1 and path[1].startswith('layers_'):
      i = int(path[1][len('layers_'):])
      lst = out.setdefault((path[0], 'layers', *path[2:]), [None] * num_layers[path[0]])
      lst[i] = entry
    else:
      out[path] = [entry]
  return out


def _place(arr: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """Puts one host tensor on device(s); with a sharding each device copies only its slice."""
  if sharding is None:
    return jnp.asarray(np.asarray(arr).astype(dtype))
  return jax.make_array_from_callback(arr.shape, sharding,
                                      lambda idx: np.asarray(arr[idx]).astype(dtype))


def _is_scanned(path: tuple[str, ...]) -> bool:
  return len(path) > 1 and path[1] == 'layers'


def load_mapped(ckpt: SafetensorsDir, mapping: dict[tuple[str, ...], list[tuple[str, Transform]]],
                expected: Params, dtype: Any, shardings: Params | None,
                ignored: Callable[[str], bool]) -> Params:
  """Loads each expected param from its HF tensor(s); one error lists every problem."""
  flat_expected = traverse_util.flatten_dict(expected)
  flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  missing, bad_shape, problems = [], [], []
  used: set[str] = set()
  for path in flat_expected:
    if path not in mapping:
      problems.append(f'no Hugging Face name known for parameter {"/".join(path)}')
  for path, entries in mapping.items():
    want = tuple(flat_expected[path].shape) if path in flat_expected else None
    for key, fn in entries:
      used.add(key)
      if key not in ckpt:
        missing.append(key)
      elif want is not None:
        got = fn.shape(tuple(ckpt.shape(key)))
        per_layer = want[1:] if _is_scanned(path) else want
        if got != per_layer:
          bad_shape.append(f'{key}: {ckpt.shape(key)} in the file, which maps to {got} for '
                           f'{"/".join(path)}; the config needs {per_layer}')
  unexpected = sorted(k for k in ckpt.keys() if k not in used and not ignored(k))
  if missing or bad_shape or unexpected or problems:
    lines = [f'{ckpt.path}: the checkpoint does not match the model config.json describes.']
    lines += [f'  missing tensor: {k}' for k in sorted(missing)]
    lines += [f'  wrong shape: {k}' for k in bad_shape]
    lines += [f'  unexpected tensor: {k}' for k in unexpected]
    lines += [f'  {p}' for p in problems]
    raise CheckpointError('\n'.join(lines))

  flat_out = {}
  for path in flat_expected:
    entries = mapping[path]
    if _is_scanned(path):  # stack the per-layer tensors (one parameter's worth of host memory)
      host = np.stack([fn.apply(ckpt.get(k)) for k, fn in entries])
    else:
      key, fn = entries[0]
      host = fn.apply(ckpt.get(key))
    flat_out[path] = _place(host, dtype, flat_shardings.get(path))
  return traverse_util.unflatten_dict(flat_out)


def _abstract_params(model, *args, boxed: bool = False) -> Params:
  from flax import linen as nn
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))['params']
  return shapes if boxed else nn.meta.unbox(shapes)


def t5_abstract_params(config: t5_lib.T5Config, boxed: bool = True) -> Params:
  """Shape/dtype tree of T5 params; boxed with logical axis names for sharding derivation."""
  return _abstract_params(t5_lib.T5(config), jnp.zeros((1, 1, config.d_model)),
                          jnp.ones((1, 1)), jnp.zeros((1, 1), jnp.int32), boxed=boxed)


def bert_abstract_params(config: bert_lib.BertConfig, boxed: bool = True) -> Params:
  """Shape/dtype tree of BERT params; boxed with logical axis names."""
  return _abstract_params(bert_lib.Bert(config), jnp.zeros((1, 1), jnp.int32),
                          jnp.ones((1, 1), jnp.int32), boxed=boxed)


# Architectures saved without an LM head: a T5 from them has no lm_head.weight to tie or not.
_HEADLESS = ('T5Model', 'T5EncoderModel')


def _tied_embeddings(path: str, hf: dict[str, Any], ckpt: SafetensorsDir) -> bool:
  """Whether the LM head is the token-embedding table.

  A checkpoint's own lm_head.weight always wins: transformers 5 writes tie_word_embeddings=true
  into config.json even for FlanT5, whose head is separate. A missing head is an error when
  config.json says the head is separate, or when the model was saved without one (T5Model,
  e.g. after a conversion with AutoModel); guessing tied there gives wrong logits silently.
  """
  if 'lm_head.weight' in ckpt:
    return False
  headless = [a for a in hf.get('architectures') or [] if a in _HEADLESS]
  if hf.get('tie_word_embeddings') is False or headless:
    why = ('config.json says tie_word_embeddings=false' if not headless else
           f'it was saved as {headless[0]}, without an LM head')
    raise CheckpointError(f'{path}: no lm_head.weight, but {why}: the model would silently '
                          'use the embedding table as its LM head. No conversion of this '
                          'directory can restore the head: use the original checkpoint (e.g. '
                          'the Hub\'s google/flan-t5-xxl) as downloaded, or convert that '
                          'original one. ' + _conversion_hint(path, headless=True))
  return True


def load_t5_config(path: str, dtype: Any = jnp.float32, ckpt: SafetensorsDir | None = None,
                   hf: dict[str, Any] | None = None, **config_overrides) -> t5_lib.T5Config:
  """The T5Config of a Hugging Face T5 directory; tying as `_tied_embeddings` decides.

  `hf` (a published config.json, for planning without weights) replaces the directory's; with
  no checkpoint there, its tie_word_embeddings decides the head.
  """
  hf = hf if hf is not None else read_hf_config(path)
  if hf.get('model_type') not in (None, 't5'):
    raise CheckpointError(f'{path}/config.json: model_type={hf.get("model_type")!r}, not t5.')
  overrides = dict(param_dtype=dtype, **config_overrides)
  if ckpt is None and has_weights(path):
    ckpt = SafetensorsDir(path)
  overrides['tie_word_embeddings'] = (_tied_embeddings(path, hf, ckpt) if ckpt is not None else
                                      bool(hf.get('tie_word_embeddings', True)))
  return t5_lib.T5Config.from_hf(hf, **overrides)


def has_weights(path: str) -> bool:
  """Whether `path` is a directory holding safetensors weights (the planner may go without)."""
  return bool(path) and storage.isdir(path) and any(
      f.endswith('.safetensors') for f in storage.listdir(path))


def abstract_placed(boxed: Params, dtype: Any, shardings: Params | Callable | None) -> Params:
  """What loading would give, without the data: a ShapeDtypeStruct per tensor, in `dtype` and
  placed in its sharding (for the planner's AOT compiles)."""
  placed = _resolve_shardings(shardings, boxed)
  flat_shardings = traverse_util.flatten_dict(placed) if placed is not None else {}
  flat = traverse_util.flatten_dict(_unbox(boxed))
  return traverse_util.unflatten_dict({
      k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=flat_shardings.get(k))
      for k, v in flat.items()})


def _resolve_shardings(shardings, abstract_boxed):
  return shardings(abstract_boxed) if callable(shardings) else shardings


def load_t5(path: str, dtype: Any = jnp.float32, shardings: Params | Callable | None = None,
            abstract: bool = False, hf: dict[str, Any] | None = None,
            **config_overrides) -> tuple[t5_lib.T5Config, Params]:
  """Loads a Hugging Face T5/FlanT5 directory as (T5Config, params) with params in `dtype`.

  `shardings` is a tree like the params of NamedShardings, or a function from the boxed
  abstract params (logical axis names) to one; each tensor goes straight into its sharding.
  `config_overrides` set T5Config fields (compute `dtype` is set with dataclasses.replace).
  `abstract`: no tensor is read; the params are `abstract_placed` (`hf` may stand for the
  directory's config.json).
  """
  ckpt = None if abstract else SafetensorsDir(path)
  config = load_t5_config(path, dtype, ckpt, hf, **config_overrides)
  boxed = t5_abstract_params(config)
  if abstract:
    return config, abstract_placed(boxed, dtype, shardings)
  mapping = {k: [v] for k, v in _t5_mapping(config).items()}
  if config.scan_layers:
    mapping = _stack_scanned(_t5_mapping(config), {'encoder': config.num_encoder_layers,
                                                   'decoder': config.num_decoder_layers})
  params = load_mapped(ckpt, mapping, _unbox(boxed), dtype,
                       _resolve_shardings(shardings, boxed), lambda k: k in _T5_IGNORED)
  return config, params


def _unbox(tree):
  from flax import linen as nn
  return nn.meta.unbox(tree)


def save_t5(path: str, config: t5_lib.T5Config, params: Params) -> None:
  """Writes (unscanned) params as a Hugging Face T5 directory: config.json + model.safetensors."""
  storage.makedirs(path, exist_ok=True)
  flat = traverse_util.flatten_dict(params)
  tensors = {}
  for ours, (theirs, fn) in _t5_mapping(config).items():
    tensors[theirs] = np.ascontiguousarray(fn.apply(np.asarray(flat[ours], np.float32)))
  storage.save_safetensors(tensors, os.path.join(path, 'model.safetensors'))
  hf = dict(model_type='t5', architectures=['T5ForConditionalGeneration'],
            vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
            d_ff=config.d_ff, num_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            layer_norm_epsilon=config.layer_norm_epsilon,
            feed_forward_proj=('gated-' if config.gated else '') + (
                'gelu' if config.activation == 'gelu_new' else config.activation),
            tie_word_embeddings=config.tie_word_embeddings,
            scale_decoder_outputs=config.scale_decoder_outputs,
            pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
            decoder_start_token_id=config.decoder_start_token_id, dropout_rate=0.0)
  fileio.write_json(os.path.join(path, 'config.json'), hf)


def embedding_table(path: str) -> np.ndarray:
  """The [vocab, d] token-embedding table of a T5 directory, read from disk alone."""
  return np.asarray(SafetensorsDir(path).get('shared.weight'))


def _decoder_mapping(c: decoder_lib.DecoderConfig) -> dict[tuple[str, ...], tuple[str, Transform]]:
  """Our decoder param paths -> Hugging Face Llama/Qwen2/Qwen3 tensor names."""
  m = {('token_embedder', 'embedding'): ('model.embed_tokens.weight', _I),
       ('layers', 'final_norm', 'scale'): ('model.norm.weight', _I)}
  attn = {'query': ('q_proj', c.qkv_bias), 'key': ('k_proj', c.qkv_bias),
          'value': ('v_proj', c.qkv_bias), 'out': ('o_proj', c.out_bias)}
  for i in range(c.num_layers):
    ours, pre = ('layers', f'layers_{i}'), f'model.layers.{i}'
    m[(*ours, 'input_norm', 'scale')] = (f'{pre}.input_layernorm.weight', _I)
    m[(*ours, 'post_attention_norm', 'scale')] = (f'{pre}.post_attention_layernorm.weight', _I)
    for name, (theirs, bias) in attn.items():
      m[(*ours, 'attention', name, 'kernel')] = (f'{pre}.self_attn.{theirs}.weight', _T)
      if bias:
        m[(*ours, 'attention', name, 'bias')] = (f'{pre}.self_attn.{theirs}.bias', _I)
    if c.qk_norm:
      m[(*ours, 'attention', 'query_norm', 'scale')] = (f'{pre}.self_attn.q_norm.weight', _I)
      m[(*ours, 'attention', 'key_norm', 'scale')] = (f'{pre}.self_attn.k_norm.weight', _I)
    for name, theirs in (('wi_0', 'gate_proj'), ('wi_1', 'up_proj'), ('wo', 'down_proj')):
      m[(*ours, 'mlp', name, 'kernel')] = (f'{pre}.mlp.{theirs}.weight', _T)
      if c.mlp_bias:
        m[(*ours, 'mlp', name, 'bias')] = (f'{pre}.mlp.{theirs}.bias', _I)
  if not c.tie_word_embeddings:
    m[('logits_dense', 'kernel')] = ('lm_head.weight', _T)
  return m


def decoder_abstract_params(config: decoder_lib.DecoderConfig, boxed: bool = True) -> Params:
  """Shape/dtype tree of decoder-only LM params; boxed with logical axis names."""
  from flax import linen as nn

  def init():  # the embedding table too, which a forward from embeddings does not touch
    return decoder_lib.CausalLM(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
        method=lambda m, ids: m(m.embed(ids), jnp.ones(ids.shape, jnp.int32)))['params']

  shapes = jax.eval_shape(init)
  return shapes if boxed else nn.meta.unbox(shapes)


def load_decoder_config(path: str, dtype: Any = jnp.float32, hf: dict[str, Any] | None = None,
                        **config_overrides) -> decoder_lib.DecoderConfig:
  """The DecoderConfig of a Hugging Face Llama / Qwen2 / Qwen3 directory (or of `hf`)."""
  source = os.path.join(path, 'config.json') if hf is None else f'{path or "published"} config'
  return decoder_lib.DecoderConfig.from_hf(hf if hf is not None else read_hf_config(path),
                                           source=source, param_dtype=dtype, **config_overrides)


def load_decoder(path: str, dtype: Any = jnp.float32, shardings: Params | Callable | None = None,
                 abstract: bool = False, hf: dict[str, Any] | None = None,
                 **config_overrides) -> tuple[decoder_lib.DecoderConfig, Params]:
  """Loads a Hugging Face decoder-only directory (one file or a sharded index) as (config, params).

  As `load_t5`: `shardings` is a tree of NamedShardings or a function of the boxed abstract
  params, and every tensor goes straight into its sharding, one at a time; `abstract` reads no
  tensor (`hf` may stand for config.json).
  """
  config = load_decoder_config(path, dtype, hf, **config_overrides)
  boxed = decoder_abstract_params(config)
  if abstract:
    return config, abstract_placed(boxed, dtype, shardings)
  ckpt = SafetensorsDir(path)
  flat_mapping = _decoder_mapping(config)
  mapping = {k: [v] for k, v in flat_mapping.items()}
  if config.scan_layers:
    mapping = _stack_scanned(flat_mapping, {'layers': config.num_layers})
  ignored = lambda k: k.endswith('rotary_emb.inv_freq') or (
      config.tie_word_embeddings and k == 'lm_head.weight')
  params = load_mapped(ckpt, mapping, _unbox(boxed), dtype,
                       _resolve_shardings(shardings, boxed), ignored)
  return config, params


def save_decoder(path: str, config: decoder_lib.DecoderConfig, params: Params) -> None:
  """Writes (unscanned) params as a Hugging Face Llama / Qwen2 / Qwen3 directory:
  config.json + model.safetensors, readable by transformers' *ForCausalLM and by load_decoder."""
  if config.scan_layers:
    raise ValueError('save_decoder writes unscanned params (config.scan_layers=False).')
  storage.makedirs(path, exist_ok=True)
  flat = traverse_util.flatten_dict(params)
  tensors = {theirs: np.ascontiguousarray(fn.apply(np.asarray(flat[ours], np.float32)))
             for ours, (theirs, fn) in _decoder_mapping(config).items()}
  storage.save_safetensors(tensors, os.path.join(path, 'model.safetensors'))
  architecture = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                  'qwen3': 'Qwen3ForCausalLM'}[config.model_type]
  hf = dict(model_type=config.model_type, architectures=[architecture],
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim, hidden_act='silu', rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            max_position_embeddings=config.rope_original_max_positions,
            tie_word_embeddings=config.tie_word_embeddings,
            attention_bias=config.out_bias, mlp_bias=config.mlp_bias,
            bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
            eos_token_id=list(config.eos_token_ids) if len(config.eos_token_ids) > 1
            else config.eos_token_id, torch_dtype='float32')
  if config.rope_type != 'default':
    raise ValueError(f'save_decoder writes default RoPE only, not {config.rope_type!r}.')
  fileio.write_json(os.path.join(path, 'config.json'), hf)


def decoder_embedding_table(path: str) -> np.ndarray:
  """The [vocab, d] token-embedding table of a decoder-only directory, read from disk alone."""
  return np.asarray(SafetensorsDir(path).get('model.embed_tokens.weight'))


def load_bert(path: str, dtype: Any = jnp.float32, shardings: Params | Callable | None = None,
              abstract: bool = False, hf: dict[str, Any] | None = None,
              compute_dtype: Any = jnp.float32,
              **config_overrides) -> tuple[bert_lib.BertConfig, Params]:
  """Loads a Hugging Face BERT directory (BGE, MiniLM, Contriever) as (BertConfig, params):
  the weights in `dtype`, the layers computing in `compute_dtype`.

  Pooling defaults to the sentence-transformers setting in `1_Pooling/config.json` when the
  directory has one; pass `pooling=` / `normalize=` to choose. `abstract` and `hf` as for
  `load_t5`.
  """
  hf = hf if hf is not None else read_hf_config(path)
  if hf.get('model_type') not in (None, 'bert'):
    raise CheckpointError(f'{path}/config.json: model_type={hf.get("model_type")!r}, not bert.')
  overrides = dict(param_dtype=dtype, dtype=compute_dtype)
  if path and storage.isdir(path):
    overrides.update(sentence_transformers_pooling(path))
  overrides.update(config_overrides)
  config = bert_lib.BertConfig.from_hf(hf, **overrides)
  if abstract:
    return config, abstract_placed(bert_abstract_params(config), dtype, shardings)
  ckpt = SafetensorsDir(path)
  prefix = 'bert.' if any(k.startswith('bert.') for k in ckpt.keys()) else ''
  boxed = bert_abstract_params(config)
  mapping = {k: [v] for k, v in _bert_mapping(config, prefix).items()}
  params = load_mapped(ckpt, mapping, _unbox(boxed), dtype, _resolve_shardings(shardings, boxed),
                       lambda k: _is_ignored_bert_key(k, prefix))
  return config, params


def save_bert(out_dir: str, source_dir: str, config: bert_lib.BertConfig, params: Params) -> None:
  """Writes (fine-tuned) BERT params as a Hugging Face directory beside the original's files.

  The original checkpoint's tensors are kept (the pooler, say) and every mapped one replaced;
  its config, tokenizer and sentence-transformers files are copied, so transformers'
  `AutoModel.from_pretrained(out_dir)` (the official code's loader) gets the trained encoder.
  """
  ckpt = SafetensorsDir(source_dir)
  prefix = 'bert.' if any(k.startswith('bert.') for k in ckpt.keys()) else ''
  tensors = {k: np.array(ckpt.get(k), dtype=np.float32) for k in ckpt.keys()}
  flat = traverse_util.flatten_dict(params)
  for ours, (theirs, fn) in _bert_mapping(config, prefix).items():
    tensors[theirs] = np.ascontiguousarray(fn.apply(np.asarray(flat[ours], np.float32)))
  storage.makedirs(out_dir, exist_ok=True)
  storage.save_safetensors(tensors, os.path.join(out_dir, 'model.safetensors'))
  for name in storage.listdir(source_dir):
    src = os.path.join(source_dir, name)
    if name.endswith(('.safetensors', '.bin', '.index.json', '.h5', '.msgpack', '.onnx')):
      continue
    if storage.isdir(src):
      if not storage.exists(os.path.join(out_dir, name)) and name in ('1_Pooling', '2_Normalize'):
        storage.copytree(src, os.path.join(out_dir, name))
    else:
      storage.copy(src, os.path.join(out_dir, name))


def sentence_transformers_pooling(path: str) -> dict[str, Any]:
  """Pooling and normalisation declared by a sentence-transformers directory, if any."""
  out: dict[str, Any] = {}
  pool_file = os.path.join(path, '1_Pooling', 'config.json')
  if storage.exists(pool_file):
    with storage.open(pool_file) as f:
      cfg = json.load(f)
    if cfg.get('pooling_mode_cls_token'):
      out['pooling'] = 'cls'
    elif cfg.get('pooling_mode_mean_tokens'):
      out['pooling'] = 'mean'
  modules_file = os.path.join(path, 'modules.json')
  if storage.exists(modules_file):
    with storage.open(modules_file) as f:
      out['normalize'] = any('Normalize' in m.get('type', '') for m in json.load(f))
  return out
