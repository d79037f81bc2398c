"""Throughput on LaMP-shaped data: ours (length buckets) against the reference's collation.

One run, one CPU, flan-t5-small shapes (random weights), fp32, batch 8:

- data: `synthetic.generate(lengths='lamp')` for LaMP-7 and LaMP-2 (the LaMP paper's word
  counts), mapped to tokens at the T5 SentencePiece rate for English (a word of more than five
  letters counts two tokens, about 1.3 tokens a word), plus the closing </s>;
- training, one epoch of `--examples` examples: ours groups them by `buckets.candidates` and runs
  each bucket's AOT-compiled PPlug step; the reference pads every batch to max_length (input 256
  + 2 soft tokens, target 128 with -100 labels), runs a frozen `T5ForConditionalGeneration` on
  `inputs_embeds` with the plug, and AdamW, as the official code does;
- evaluation, the same examples: ours decodes per input bucket with beam 4 (one compile per
  bucket); the reference calls Hugging Face `generate(num_beams=4, max_new_tokens=128)` on
  max_length-padded inputs. The model's </s> row is scaled (the same weights for both) so that
  greedy outputs stop near the task's output length, as a trained model's would.

Compile and warm-up time is excluded for both. Prints one JSON line with the four ratios.

    python scripts/bench_lamp_shaped.py [--examples 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import random_flan_t5_small, reference_plug
from configs import lamp as lamp_config
from pplug_jax import generation, partitioning, system as system_lib
from pplug_jax.data import buckets as buckets_lib, lamp, synthetic

B, MAX_IN, MAX_TGT, H, DE, VOCAB, BEAMS = 8, 256, 128, 16, 768, 32128, 4
OUTPUT_TOKENS = {'LaMP_7': 17.0 * 1.3, 'LaMP_2': 3.0}  # mean output tokens incl. </s>


def _tokens(text: str) -> list[int]:
  ids = []
  for word in text.split():
    pieces = 2 if len(word) > 5 else 1
    ids += [2 + zlib.crc32(f'{word}{i}'.encode()) % (VOCAB - 2) for i in range(pieces)]
  return ids + [1]  # </s>


def lamp_shaped(task: str, n: int) -> list[tuple[list[int], list[int]]]:
  """(input ids, target ids) of n LaMP-shaped synthetic examples, truncated to the maxima."""
  out_dir = tempfile.mkdtemp(prefix='bench_lamp_')
  synthetic.generate(out_dir, task, users={'train': n, 'dev': 1, 'test': 1}, seed=0,
                     lengths='lamp', mean_items=4)
  examples = lamp.load_split(out_dir, task, 'train')
  return [(_tokens(e.input)[:MAX_IN], _tokens(e.output)[:MAX_TGT]) for e in examples]


def _pad(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


def _plug_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  h = rng.normal(size=(n, H, DE)).astype(np.float32)
  h /= np.linalg.norm(h, axis=-1, keepdims=True)
  q = rng.normal(size=(n, DE)).astype(np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  return {'query_embedding': q, 'history': h, 'history_mask': np.ones((n, H), np.int32)}


def batches(data, shape_of) -> list[dict[str, np.ndarray]]:
  """Batches of B examples, each padded to shape_of(its examples); a short last one is topped
  up with copies of its first row (timing only)."""
  out = []
  for start in range(0, len(data), B):
    rows = data[start:start + B]
    rows = rows + [rows[0]] * (B - len(rows))
    li, lt = shape_of(rows)
    ids, mask = _pad([r[0] for r in rows], li)
    tids, tmask = _pad([r[1] for r in rows], lt)
    out.append(dict(_plug_inputs(B, start), input_ids=ids, input_mask=mask, target_ids=tids,
                    target_mask=tmask))
  return out


def bucketed(config, data):
  """Ours: examples grouped by bucket (in bucket order), each batch at its bucket's shape."""
  lengths = np.array([[len(x), len(y), H] for x, y in data])
  plan = buckets_lib.candidates(config, lengths)
  idx = plan.assign(*buckets_lib.clip(config, lengths))
  out = []
  for j, shape in enumerate(plan.shapes):
    group = [d for d, k in zip(data, idx) if k == j]
    out += batches(group, lambda rows, shape=shape: shape)
  return out, plan


def ours_train_epoch(system, config, data) -> tuple[float, dict]:
  tx, _ = system_lib.build_optimizer(config, 1000)
  params = system.init_trainable(0)
  state = {'step': jnp.int32(10), 'params': params, 'opt_state': tx.init(params)}
  step = jax.jit(system_lib.make_train_step(system, tx), donate_argnums=(0,))
  epoch, plan = bucketed(config, data)
  compiled = {}
  for b in epoch:
    shape = (b['input_ids'].shape[1], b['target_ids'].shape[1])
    if shape not in compiled:
      arg = {k: jnp.asarray(v)[None] for k, v in b.items()}
      compiled[shape] = step.lower(state, system.llm_params, arg).compile()
  device_batches = [{k: jnp.asarray(v)[None] for k, v in b.items()} for b in epoch]
  holder = [state]

  def run():
    for b in device_batches:
      fn = compiled[(b['input_ids'].shape[2], b['target_ids'].shape[2])]
      holder[0], m = fn(holder[0], system.llm_params, b)
    m['loss'].block_until_ready()

  run()  # warm-up
  t = time.perf_counter()
  run()
  real = sum(len(x) + len(y) for x, y in data)
  padded = sum(b['input_ids'].size + b['target_ids'].size for b in epoch)
  return time.perf_counter() - t, {'shapes': [list(s) for s in plan.shapes],
                                   'batches': len(epoch), 'token_efficiency': real / padded}


def ours_eval(system, config, data) -> float:
  settings = generation.GenerationSettings.from_config(config)
  epoch, _ = bucketed(config, data)
  gen = generation.SplitGenerator(system, config, settings).jitted(persona=True)
  params = system.init_trainable(0)
  device_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in epoch]

  def run():
    for b in device_batches:
      tokens, _, _ = gen(params, system.llm_params, b)
    tokens.block_until_ready()

  run()  # compiles once per bucket
  t = time.perf_counter()
  run()
  return time.perf_counter() - t


def _reference_inputs(model, plug, b):
  import torch
  t = {k: torch.tensor(v) for k, v in b.items()}
  soft = plug(t['query_embedding'], t['history'], t['history_mask'].float())
  emb = torch.cat([soft, model.shared(t['input_ids'].long())], 1)
  mask = torch.cat([torch.ones(B, 2, dtype=torch.long), t['input_mask'].long()], 1)
  labels = t['target_ids'].long().masked_fill(t['target_mask'] == 0, -100)
  return emb, mask, labels


def reference_train_epoch(model, data) -> float:
  import torch
  plug = reference_plug(DE, model.config.d_model)
  opt = torch.optim.AdamW(plug.parameters(), lr=1e-4, weight_decay=1e-4)
  epoch = batches(data, lambda rows: (MAX_IN, MAX_TGT))  # padding='max_length'

  def run():
    for b in epoch:
      emb, mask, labels = _reference_inputs(model, plug, b)
      loss = model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss
      opt.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(plug.parameters(), 1.0)
      opt.step()

  run_one = epoch[:1]
  emb, mask, labels = _reference_inputs(model, plug, run_one[0])  # warm-up
  model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss.backward()
  t = time.perf_counter()
  run()
  return time.perf_counter() - t


def reference_eval(model, data) -> float:
  import torch
  plug = reference_plug(DE, model.config.d_model)
  epoch = batches(data, lambda rows: (MAX_IN, MAX_TGT))

  def run():
    with torch.no_grad():
      for b in epoch:
        emb, mask, _ = _reference_inputs(model, plug, b)
        model.generate(inputs_embeds=emb, attention_mask=mask, num_beams=BEAMS,
                       max_new_tokens=MAX_TGT, early_stopping=False, length_penalty=1.0)

  with torch.no_grad():  # warm-up
    emb, mask, _ = _reference_inputs(model, plug, epoch[0])
    model.generate(inputs_embeds=emb, attention_mask=mask, num_beams=BEAMS, max_new_tokens=4)
  t = time.perf_counter()
  run()
  return time.perf_counter() - t


def calibrate_eos(model, system, config, data, target: float) -> float:
  """Scales the </s> row of the LM head (both frameworks share it) so greedy outputs of the
  random model stop near `target` tokens; returns the scale."""
  import torch
  head = model.lm_head.weight
  if not hasattr(model, 'pristine_eos_row'):  # each task calibrates from the untouched weights
    model.pristine_eos_row = head.data[1].clone()
    model.pristine_params = system.llm_params
  original, flat = model.pristine_eos_row, model.pristine_params
  best, best_gap = 1.0, float('inf')
  sample = batches(data[:B], lambda rows: (MAX_IN, MAX_TGT))[0]
  settings = generation.GenerationSettings(num_beams=1, max_new_tokens=MAX_TGT,
                                           length_penalty=1.0, early_stopping=False)
  for scale in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0):
    row = original * scale
    params = _with_eos_row(flat, row.numpy())
    trial = system_lib.System(system.mesh, system.rules, system.llm, params, system.plug,
                              system.encoder_dim)
    gen = generation.SplitGenerator(trial, config, settings).jitted(True)
    tokens, _, _ = gen(system.init_trainable(0), params, {k: jnp.asarray(v) for k, v in
                                                          sample.items()})
    tokens = np.asarray(tokens)
    lengths = [(list(r).index(1) + 1) if 1 in r else MAX_TGT for r in tokens]
    gap = abs(np.mean(lengths) - target)
    if gap < best_gap:
      best, best_gap = scale, gap
  with torch.no_grad():
    head.data[1] = original * best
  system.llm_params = _with_eos_row(flat, (original * best).numpy())
  return best


def _with_eos_row(params, row):
  """The params with the </s> column of the untied LM head (decoder/logits_dense) replaced."""
  head = params['decoder']['logits_dense']
  decoder = dict(params['decoder'], logits_dense=dict(
      head, kernel=head['kernel'].at[:, 1].set(jnp.asarray(row))))
  return dict(params, decoder=decoder)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--examples', type=int, default=64)
  args = parser.parse_args()
  import torch
  model, path = random_flan_t5_small()
  config = lamp_config.get_config('task=7,size=small')
  config.llm.path = path
  config.llm.dtype = config.llm.param_dtype = 'float32'
  config.data.max_input_length, config.data.max_target_length = MAX_IN, MAX_TGT
  config.eval.num_beams, config.eval.max_new_tokens = BEAMS, MAX_TGT
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  system = system_lib.load_system(config, DE, mesh)
  out = {'model': 'flan-t5-small shapes, random weights, fp32', 'batch': B,
         'examples': args.examples, 'torch_threads': torch.get_num_threads(),
         'device': str(jax.devices()[0])}
  for task, key in (('LaMP_7', 'lamp7'), ('LaMP_2', 'lamp2')):
    data = lamp_shaped(task, args.examples)
    config.task = task
    eos_scale = calibrate_eos(model, system, config, data, OUTPUT_TOKENS[task])
    ours_train, info = ours_train_epoch(system, config, data)
    ref_train = reference_train_epoch(model, data)
    ours_eval_s = ours_eval(system, config, data)
    ref_eval_s = reference_eval(model, data)
    n = args.examples
    out[f'{key}_mean_input_tokens'] = float(np.mean([len(x) for x, _ in data]))
    out[f'{key}_mean_target_tokens'] = float(np.mean([len(y) for _, y in data]))
    out[f'{key}_bucket_shapes'] = info['shapes']
    # real tokens / tokens computed: bucketed, and padded to the maxima (the reference's)
    out[f'{key}_token_efficiency'] = {
        'buckets': info['token_efficiency'],
        'max_length': sum(len(x) + len(y) for x, y in data) / (
            len(batches(data, lambda rows: (MAX_IN, MAX_TGT))) * B * (MAX_IN + MAX_TGT))}
    out[f'{key}_eos_scale'] = eos_scale
    out[f'{key}_train_examples_per_s'] = {'ours': n / ours_train, 'reference': n / ref_train}
    out[f'{key}_eval_examples_per_s'] = {'ours': n / ours_eval_s, 'reference': n / ref_eval_s}
    out[f'train_ratio_{key}'] = ref_train / ours_train
    out[f'eval_ratio_{key}'] = ref_eval_s / ours_eval_s
  print(json.dumps(out))


if __name__ == '__main__':
  main()
