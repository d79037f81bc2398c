"""Loading Hugging Face directories: sharded placement and clear errors on bad input."""

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from multidevice_util import run_on_8_devices
from pplug_jax.models import hf_weights


def test_sharded_load_on_8_devices_matches_unsharded(tiny_t5):
  out = run_on_8_devices('sharded_load.py', tiny_t5['v1.1'][0])
  assert out['max_abs_diff'] <= 1e-5


def test_directory_without_safetensors(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "t5"}')
  with pytest.raises(hf_weights.CheckpointError, match='no \\*.safetensors'):
    hf_weights.load_t5(str(tmp_path))


def test_pickle_only_directory_is_refused_with_conversion_hint(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "t5"}')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not really a pickle')
  with pytest.raises(hf_weights.CheckpointError) as err:
    hf_weights.load_t5(str(tmp_path))
  msg = str(err.value)
  assert 'pytorch_model.bin' in msg and 'save_pretrained' in msg and str(tmp_path) in msg


def test_wrong_shape_missing_and_unexpected_are_listed_together(tiny_t5, tmp_path):
  src = tiny_t5['v1.1'][0]
  bad = tmp_path / 'bad'
  shutil.copytree(src, bad)
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  tensors['encoder.block.0.layer.0.SelfAttention.q.weight'] = np.zeros((5, 32), np.float32)
  del tensors['decoder.final_layer_norm.weight']
  tensors['encoder.block.9.extra.weight'] = np.zeros((2,), np.float32)
  save_file(tensors, str(bad / 'model.safetensors'))
  with pytest.raises(hf_weights.CheckpointError) as err:
    hf_weights.load_t5(str(bad))
  msg = str(err.value)
  assert 'wrong shape: encoder.block.0.layer.0.SelfAttention.q.weight: (5, 32)' in msg
  assert 'missing tensor: decoder.final_layer_norm.weight' in msg
  assert 'unexpected tensor: encoder.block.9.extra.weight' in msg


def test_sharded_safetensors_index_and_bf16(tiny_t5, tmp_path):
  """A sharded checkpoint (index.json) in bf16 loads to the same values as the bf16 cast."""
  import ml_dtypes
  src = tiny_t5['v1.1'][0]
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  names = sorted(tensors)
  half = len(names) // 2
  out = tmp_path / 'sharded'
  out.mkdir()
  shutil.copy(os.path.join(src, 'config.json'), out / 'config.json')
  import json
  import torch
  from safetensors.torch import save_file as save_torch
  weight_map = {}
  for i, chunk in enumerate((names[:half], names[half:])):
    fname = f'model-0000{i + 1}-of-00002.safetensors'
    save_torch({n: torch.tensor(tensors[n]).to(torch.bfloat16) for n in chunk}, str(out / fname))
    weight_map.update({n: fname for n in chunk})
  (out / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  import jax.numpy as jnp
  _, params = hf_weights.load_t5(str(out), dtype=jnp.bfloat16)
  emb = np.asarray(params['token_embedder']['embedding'].astype(jnp.float32))
  want = tensors['shared.weight'].astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(emb, want)
  q = np.asarray(params['decoder']['layers_2']['self_attention']['query']['kernel'].astype(jnp.float32))
  want_q = tensors['decoder.block.2.layer.0.SelfAttention.q.weight'].T.astype(
      ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(q, want_q)
