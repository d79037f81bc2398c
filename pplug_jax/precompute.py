"""Embeds every profile item and query once and writes sharded TFRecords plus metadata.

    python -m pplug_jax.precompute --config configs/lamp.py:task=2 \
        --config.encoder.path=DIR --config.llm.path=DIR --config.data.lamp_dir=DIR \
        --config.data.records_dir=OUT

Resumable: a shard is written to `*.tmp` and renamed when complete, finished shards are kept,
and a rerun continues with the rest. Records made with another encoder, tokenizer, max lengths
or input files are refused.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from pplug_jax import storage
from pplug_jax import cli, features, fileio, partitioning, system, tokenizers, validation
from pplug_jax.data import lamp, records
from pplug_jax.errors import RecordsError
from pplug_jax.models import hf_weights, numerics
from pplug_jax.models.text_encoder import TextEncoder
from pplug_jax.workdir_lock import records_lock


def fingerprint(config) -> dict[str, Any]:
  """What the records depend on besides the input files, read without loading any weights.

  Without config.encoder.path (training from finished records alone) the encoder's directory,
  dimension and tokenizer are left out: they cannot be checked.
  """
  spec = lamp.task_spec(config.task)
  out = dict(
      task=spec.name, split_type=config.split_type, encoder_name=config.encoder.name,
      pooling=config.encoder.pooling, normalize=bool(config.encoder.normalize),
      embedding_dtype=config.data.embedding_dtype,
      encoder_dtype=numerics.resolve_dtype(config.encoder.dtype),
      query_prefix=config.encoder.query_prefix,
      llm_tokenizer=tokenizers.tokenizer_name(tokenizers.llm_tokenizer(config)),
      max_input_length=config.data.max_input_length,
      max_target_length=config.data.max_target_length, max_history=config.data.max_history,
      item_max_length=config.data.item_max_length,
      query_max_length=config.data.query_max_length, num_shards=config.data.num_shards)
  if config.plug.retrieval:  # only then, so records made before this key still match
    out['plug_retrieval'] = f'{config.plug.retrieval}:{config.plug.retrieval_k}'
  if config.data.history_order != 'date':  # likewise
    out['history_order'] = config.data.history_order
  if config.data.query_source != 'input':  # likewise
    out['query_source'] = config.data.query_source
  if config.llm.get('chat_template'):  # likewise
    out['llm_chat_template'] = True
  if config.encoder.path:
    out.update(encoder_path=storage.abspath(config.encoder.path),
              dim=int(hf_weights.read_hf_config(config.encoder.path)['hidden_size']),
              encoder_tokenizer=tokenizers.tokenizer_name(
                  tokenizers.load_tokenizer(config.encoder.path)))
  return out


# in a fingerprint only when set
_OPTIONAL_KEYS = ('plug_retrieval', 'history_order', 'query_source')
_HOW_TO_PROCEED = ('Use a new config.data.records_dir, or pass --config.data.rebuild_records=True '
                   'to delete these records and make them again.')


def verify_records(config, out_dir: str, current: dict[str, Any] | None = None,
                   advice: str = _HOW_TO_PROCEED) -> dict[str, Any]:
  """The records' metadata, if they were made from these settings and input files; else raises
  a RecordsError ending with `advice` (what the calling command's user should do).

  Returns {} when `out_dir` holds no records yet.
  """
  if not storage.exists(os.path.join(out_dir, records.METADATA)):
    return {}
  meta = records.read_metadata(out_dir)
  current = fingerprint(config) if current is None else current
  old = meta.get('fingerprint', {})
  if config.encoder.dtype == numerics.AUTO and 'encoder_dtype' in old:
    # 'auto' takes the precision the records hold: records made on a TPU (bfloat16) serve a
    # run on CPU, and a resumed precompute goes on in the precision it began with
    current = dict(current, encoder_dtype=old['encoder_dtype'])
  keys = set(current) | (set(old) & set(_OPTIONAL_KEYS))  # an optional key may be set on one side
  changed = {k: (old.get(k), current.get(k)) for k in keys if old.get(k) != current.get(k)}
  if changed:
    what = '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in sorted(changed.items()))
    raise RecordsError(f'{out_dir}: these records were made with other settings ({what}). '
                       + advice)
  if config.data.lamp_dir:
    root = lamp.task_dir(config.data.lamp_dir, config.task, config.split_type)
    for split, info in meta.get('splits', {}).items():
      try:
        files = lamp.split_files(root, split)
      except lamp.LampError:
        continue  # a split no longer there is simply not used
      if fileio.sha256_of(list(files)) != info['sha256']:
        raise RecordsError(f'{out_dir}: the {split} records were made from other input files '
                           f'({files[0]} or its outputs file changed since). ' + advice)
  return meta


def delete_records(out_dir: str) -> int:
  """Removes the records pplug_jax wrote in `out_dir` (shards and metadata); returns the count."""
  names = [n for n in storage.listdir(out_dir)
           if n == records.METADATA or n.startswith(tuple(f'{s}.tfrecord-' for s in lamp.SPLITS))]
  for n in names:
    storage.remove(os.path.join(out_dir, n))
  return len(names)


def _shard_features(config, examples: list[lamp.Example], llm_tok,
                    raw: dict[str, dict] | None) -> list[features.Features]:
  """Each example's features (the same function as the inference API's)."""
  return [features.build(config, ex, llm_tok, raw[ex.id]['profile'] if raw else None)
          for ex in examples]


def _raw_questions(config, split: str) -> dict[str, dict] | None:
  """{id: question dict} when the features need every profile field (PPlug + retrieval)."""
  if not features.needs_profile_fields(config):
    return None
  qfile, questions, _ = lamp.raw_questions(config, split)
  features.check_profile_fields(config, qfile, questions)
  return {str(q['id']): q for q in questions}


def _count_reused_ids(feats: list[features.Features], stats: dict[str, int]) -> None:
  """Items are keyed by their text, not their id: ids need only be unique within a user (other
  datasets number each user's items from 0), and the same text has the same embedding anyway."""
  first_text: dict[str, str] = {}
  for f in feats:
    for item in f.history:
      if first_text.setdefault(item.id, item.text) != item.text:
        stats['item_ids_reused_with_other_text'] += 1


def check_llm_weights(config, required: bool) -> None:
  """The LLM's weight files are readable safetensors (headers, sizes) and of a supported
  family: checked in seconds, before the long encoding, not after it. Standalone precompute
  needs only the tokenizer, so there (required=False) a folder without weights passes."""
  path = config.llm.path
  if not path or config.demo and not storage.isdir(path):
    return
  names = storage.listdir(path) if storage.isdir(path) else []
  if required or any(n.endswith(('.safetensors', '.bin', '.pt', '.pth')) for n in names):
    hf_weights.SafetensorsDir(path)
    system.llm_family(path)


def run(config, workdir: str = '', stop_after_shards: int | None = None) -> dict[str, Any]:
  """Precomputes every split found; returns the metadata. `stop_after_shards` is for tests.

  The records folder is locked meanwhile: two runs (in two workdirs) sharing one
  config.data.records_dir never write into it at once, and the second then finds the first's
  records and verifies them against its own settings."""
  out_dir = records.records_dir(config, workdir)
  storage.makedirs(out_dir, exist_ok=True)
  main_process = partitioning.is_main_process()
  with records_lock(out_dir, workdir) if main_process else contextlib.nullcontext():
    return _run(config, workdir, stop_after_shards)


def _run(config, workdir: str, stop_after_shards: int | None) -> dict[str, Any]:
  spec = lamp.task_spec(config.task)
  out_dir = records.records_dir(config, workdir)
  root = lamp.task_dir(config.data.lamp_dir, spec.name, config.split_type)
  if not config.data.lamp_dir or not storage.isdir(root):
    raise lamp.LampError(f'config.data.lamp_dir={config.data.lamp_dir!r}: no {root}. Download '
                         f'LaMP ({spec.name}) and point config.data.lamp_dir at the folder '
                         f'holding {os.path.basename(root)}/.')
  llm_tok = tokenizers.llm_tokenizer(config)
  encoding = tokenizers.llm_encoding(config, llm_tok)  # validated before any work
  current = fingerprint(config)
  meta = verify_records(config, out_dir, current) or {'fingerprint': current, 'splits': {}}
  encoder = TextEncoder(config.encoder.path, config.encoder.pooling, config.encoder.normalize,
                        meta['fingerprint']['encoder_dtype'], config.encoder.batch_size,
                        config.data.item_max_length)
  if current['dim'] != encoder.dim:  # read from config.json, then from the loaded weights
    raise RecordsError(f'{config.encoder.path}: config.json says hidden_size {current["dim"]}, '
                       f'the weights give {encoder.dim}.')
  main_process, pi, pc = partitioning.is_main_process(), jax.process_index(), jax.process_count()
  if main_process:  # process 0 writes the metadata; each process encodes its own shards
    records.write_metadata(out_dir, meta)
  stats = {'items_encoded': 0, 'item_ids_reused_with_other_text': 0}
  shards_done = 0
  start = time.time()
  for split in lamp.SPLITS:
    try:
      qfile, ofile = lamp.split_files(root, split)
    except lamp.LampError:
      logging.info('%s: no %s split, skipped.', root, split)
      continue
    examples = lamp.load_split(config.data.lamp_dir, spec.name, split, config.split_type)
    raw = _raw_questions(config, split)
    digest = fileio.sha256_of([qfile, ofile])
    n = config.data.num_shards
    parts = np.array_split(np.arange(len(examples)), n)
    meta['splits'][split] = {
        'sha256': digest, 'examples': len(examples), 'shard_counts': [len(p) for p in parts],
        'empty_histories': sum(not e.profile for e in examples),
        'truncated_histories': sum(len(e.profile) > config.data.max_history for e in examples),
        'has_outputs': ofile is not None}
    if main_process:
      records.write_metadata(out_dir, meta)
    for shard, rows in enumerate(parts):
      path = records.shard_path(out_dir, split, shard, n)
      if shard % pc != pi or storage.exists(path):
        continue  # another process's, or finished earlier
      if stop_after_shards is not None and shards_done >= stop_after_shards:
        return meta
      shard_examples = [examples[i] for i in rows]
      feats = _shard_features(config, shard_examples, llm_tok, raw)
      _count_reused_ids(feats, stats)
      item_emb, query_emb = features.encode(config, encoder, feats)
      stats['items_encoded'] += len(item_emb) + len(query_emb)
      records.write_shard(path, (
          features.serialize(config, ex.id, f, ex.output, encoding, encoder, item_emb, q_emb)
          for ex, f, q_emb in zip(shard_examples, feats, query_emb)))
      shards_done += 1
      logging.info('%s: wrote %s (%d examples)', split, path, len(rows))
  partitioning.sync('precompute done')
  elapsed = time.time() - start
  meta['stats'] = dict(stats, processes=pc, seconds=round(elapsed, 2),
                       items_per_second=round(stats['items_encoded'] / max(elapsed, 1e-9), 1))
  if stats['item_ids_reused_with_other_text']:
    logging.info('%d profile items reuse another item\'s id with other text; items are keyed by '
                 'their text, so each keeps its own embedding.',
                 stats['item_ids_reused_with_other_text'])
  if main_process:
    records.write_metadata(out_dir, meta)
  partitioning.sync('precompute metadata')
  return meta


def main(argv):
  del argv
  with cli.job('precompute', lambda c: validation.precompute_problems(
      c, flags.FLAGS.workdir)) as config:
    check_llm_weights(config, required=False)
    meta = run(config, flags.FLAGS.workdir)
  logging.info('precompute done: %s', meta.get('stats'))
  print(meta.get('stats'))


if __name__ == '__main__':
  cli.define_config_and_workdir('Records go to <workdir>/records unless config.data.records_dir '
                                'is set.', workdir_required=False)
  cli.run(main)
