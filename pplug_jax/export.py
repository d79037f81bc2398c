"""Exports the trained plug alone (no backbone): safetensors + a JSON config.

    python -m pplug_jax.export --workdir DIR --out OUT [--checkpoint best] [--reference_names]
        [--overwrite]

OUT must be new, empty or an earlier export of the same run; --overwrite writes into a folder
holding other files (left alone) or another run's export. The workdir itself and a folder
holding a model are always refused.

OUT/plug.safetensors holds the plug ('align_mlp/fc1/kernel', ..., 'inst_token'), plus
'query_encoder/...' when the input encoder was fine-tuned (then also OUT/query_encoder/, a Hugging
Face directory of the fine-tuned encoder); OUT/plug_config.json says which base
LLM and encoder it belongs to, its dims, scales, task and dev metrics. --reference_names also
writes OUT/pplug_reference.safetensors with the reference PyTorch names and layouts
(inst_token, align_mlp_inst.{0,2}.{weight,bias}, align_mlp.{0,2}.{weight,bias}).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import flags
from flax import traverse_util

from pplug_jax import storage
from pplug_jax import checkpoints, cli, fileio, system as system_lib
from pplug_jax.data import records
from pplug_jax.errors import UserError
from pplug_jax.models import bert as bert_lib, hf_weights, plug as plug_lib
from pplug_jax.workdir_lock import held

FORMAT = 'pplug_jax.plug/2'  # /2: the whole training config is recorded (features.build)
PLUG_FILE = 'plug.safetensors'
CONFIG_FILE = 'plug_config.json'
REFERENCE_FILE = 'pplug_reference.safetensors'
QUERY_ENCODER_DIR = 'query_encoder'  # the fine-tuned input encoder, as a Hugging Face directory


def _flat(tree: dict) -> dict[str, np.ndarray]:
  # np.array, not np.ascontiguousarray: that one makes a scalar (time_decay_raw) of shape (1,)
  return {'/'.join(k): np.array(v, np.float32, order='C')
          for k, v in traverse_util.flatten_dict(tree).items()}


def reference_names(plug_params: dict) -> dict[str, np.ndarray]:
  """The reference implementation's parameter names; torch Linear weights are [out, in]."""
  out = {'inst_token': np.asarray(plug_params['inst_token'], np.float32)}
  for mlp in ('align_mlp', 'align_mlp_inst'):  # same module names; nn.Sequential indices
    for fc, idx in (('fc1', 0), ('fc2', 2)):
      out[f'{mlp}.{idx}.weight'] = np.ascontiguousarray(plug_params[mlp][fc]['kernel'].T,
                                                        np.float32)
      out[f'{mlp}.{idx}.bias'] = np.asarray(plug_params[mlp][fc]['bias'], np.float32)
  return out


OWN_NAMES = (PLUG_FILE, CONFIG_FILE, REFERENCE_FILE, QUERY_ENCODER_DIR)
# A Hugging Face model's files: a plug written beside them breaks that model's loading.
MODEL_FILES = ('config.json', 'model.safetensors', 'model.safetensors.index.json',
               'pytorch_model.bin', 'tokenizer.json', 'tokenizer_config.json', 'spiece.model')


def check_out(workdir: str, out: str, overwrite: bool = False) -> None:
  """Refuses an --out that is the workdir, holds a model, or holds anything but an earlier
  export of this run (the last unless `overwrite`), before anything is read or written."""
  real = storage.realpath(out)
  if storage.exists(out) and not storage.isdir(out):
    raise UserError(f'--out={out}: a file, not a folder. Give a new or empty folder.')
  if real == storage.realpath(workdir):
    raise UserError(f'--out={out} is the workdir itself; export to a folder of its own, e.g. '
                    f'--out={os.path.join(workdir, "plug")}.')
  if not storage.isdir(out):
    return
  names = sorted(storage.listdir(out))
  model = [n for n in names if n in MODEL_FILES or (n.endswith('.safetensors') and
                                                    n not in OWN_NAMES)]
  if model:
    raise UserError(f'--out={out} holds a model ({", ".join(model)}); a plug written there '
                    'would break its loading. Export to a folder of its own.')
  others = [n for n in names if n not in OWN_NAMES]
  earlier = os.path.join(out, CONFIG_FILE)
  source = fileio.read_json(earlier).get('source_workdir') if storage.exists(earlier) else None
  if overwrite:
    return
  if others:
    raise UserError(f'--out={out} already holds other files ({", ".join(others[:5])}'
                    f'{", ..." if len(others) > 5 else ""}). Give a new or empty folder, or pass '
                    '--overwrite to write the plug beside them (they are left as they are).')
  if names and source != storage.abspath(workdir):
    raise UserError(f'--out={out} holds an export of another run ({source or "unknown"}). Give '
                    'a new folder, or pass --overwrite to replace it.')


def export(workdir: str, out: str, which: str = 'best', with_reference_names: bool = False,
           config=None, overwrite: bool = False) -> dict[str, Any]:
  """Writes the plug of a workdir's checkpoint to `out`; returns the written plug config.

  `out` may be new, empty or an earlier export of this run; anything else needs `overwrite`
  (see check_out). Only the files written here get their modes set."""
  check_out(workdir, out, overwrite)
  config = config or checkpoints.load_config(workdir)
  trainable, step = checkpoints.load_params(workdir, which)
  llm_hf = hf_weights.read_hf_config(config.llm.path)
  meta = records.read_metadata(records.records_dir(config, workdir))
  # the scale the plug was trained with (derived from the backbone unless set in the config)
  table = (hf_weights.embedding_table(config.llm.path) if llm_hf.get('model_type', 't5') == 't5'
           else hf_weights.decoder_embedding_table(config.llm.path))
  scale = plug_lib.persona_scale(config, table)  # as training derives it (every row)
  metrics = {}
  result_file = os.path.join(workdir, 'train_result.json')
  if storage.exists(result_file):
    with storage.open(result_file) as f:
      metrics = json.load(f).get('dev', {})
  storage.makedirs(out, exist_ok=True)
  tensors = {f'plug/{k}': v for k, v in _flat(trainable['plug']).items()}
  if 'query_encoder' in trainable:
    tensors.update({f'query_encoder/{k}': v for k, v in _flat(trainable['query_encoder']).items()})
  storage.save_safetensors(tensors, os.path.join(out, PLUG_FILE))
  if 'query_encoder' in trainable:  # the fine-tuned BGE, loadable by the official PersonalLLM
    bert_config = bert_lib.BertConfig.from_hf(hf_weights.read_hf_config(config.encoder.path),
                                              pooling=config.encoder.pooling)
    hf_weights.save_bert(os.path.join(out, QUERY_ENCODER_DIR), config.encoder.path, bert_config,
                         trainable['query_encoder'])
  fingerprint = meta['fingerprint']
  plug_config = {
      'format': FORMAT, 'task': config.task, 'step': step, 'dev_metrics': metrics,
      'llm': {'name': config.llm.name, 'path': config.llm.path, 'tokenizer': config.llm.tokenizer,
              'family': system_lib.llm_family(config.llm.path),
              'd_model': int(llm_hf.get('d_model') or llm_hf['hidden_size']),
              'dtype': config.llm.dtype,
              'vocab_limit': system_lib.vocab_limit(config)},
      'encoder': {'name': config.encoder.name, 'path': config.encoder.path,
                  'dim': fingerprint['dim'],
                  'pooling': fingerprint['pooling'], 'normalize': fingerprint['normalize'],
                  'query_prefix': config.encoder.query_prefix, 'mode': config.encoder.mode},
      'persona_scale': scale,
      'instruction_scale': scale / config.plug.instruction_scale_divisor,
      'num_soft_tokens': plug_lib.num_soft_tokens(config.plug),
      'data': {'max_input_length': config.data.max_input_length,
               'max_history': config.data.max_history,
               'item_max_length': config.data.item_max_length,
               'query_max_length': config.data.query_max_length},
      'generation': {'num_beams': config.eval.num_beams,
                     'length_penalty': config.eval.length_penalty,
                     'early_stopping': config.eval.early_stopping,
                     'max_new_tokens': config.eval.max_new_tokens},
  }
  # Every setting the example features depend on (features.build: query_source, retrieval,
  # history order and size, lengths, chat template, ...): the training config, whole.
  plug_config['config'] = json.loads(config.to_json_best_effort())
  plug_config['records_fingerprint'] = fingerprint
  plug_config['source_workdir'] = storage.abspath(workdir)  # "an earlier export of this run"
  fileio.write_json(os.path.join(out, CONFIG_FILE), plug_config)
  written = [os.path.join(out, PLUG_FILE)]
  if with_reference_names:
    storage.save_safetensors(reference_names(trainable['plug']), os.path.join(out, REFERENCE_FILE))
    written.append(os.path.join(out, REFERENCE_FILE))
  if 'query_encoder' in trainable:  # a folder of its own, written here whole
    written += [os.path.join(d, n) for d, _, names in storage.walk(os.path.join(out, QUERY_ENCODER_DIR))
                for n in names]
  for path in written:  # safetensors writes 0600; exports are shared. Nothing else is touched.
    storage.chmod_readable(path)
  return plug_config


def load_export(path: str) -> tuple[dict[str, Any], dict]:
  """(plug config, trainable params tree) of an export directory, with a clear error if broken."""
  cfg_file, plug_file = os.path.join(path, CONFIG_FILE), os.path.join(path, PLUG_FILE)
  if not storage.exists(cfg_file) or not storage.exists(plug_file):
    raise UserError(f'{path}: not a plug export (needs {CONFIG_FILE} and {PLUG_FILE}); '
                            'make one with python -m pplug_jax.export --workdir DIR --out ' + path)
  with storage.open(cfg_file) as f:
    plug_config = json.load(f)
  if plug_config.get('format') == 'pplug_jax.plug/1':
    raise UserError(f'{cfg_file}: an export from before pplug_jax recorded the input settings '
                    '(query source, PPlug + retrieval, history order, plug variant); served '
                    'with guessed ones its outputs would differ from evaluate\'s. Export it '
                    f'again: python -m pplug_jax.export --workdir {plug_config.get("source_workdir", "DIR")} --out NEW_DIR.')
  if plug_config.get('format') != FORMAT or not isinstance(plug_config.get('config'), dict):
    raise UserError(f'{cfg_file}: unknown format {plug_config.get("format")!r} or no recorded '
                    'config; export it again with python -m pplug_jax.export.')
  flat = storage.load_safetensors(plug_file)
  tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  if 'plug' not in tree:
    raise UserError(f'{plug_file}: holds no plug/ tensors; re-export it with '
                    'python -m pplug_jax.export.')
  return plug_config, tree


FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.check_workdir(FLAGS.out, '--out')
  with held(FLAGS.workdir if storage.isdir(FLAGS.workdir) else '', 'export'):
    cfg = export(FLAGS.workdir, FLAGS.out, FLAGS.checkpoint, FLAGS.reference_names,
                 overwrite=FLAGS.overwrite)
  print(json.dumps(cfg, indent=1))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'The training workdir.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
  flags.DEFINE_bool('reference_names', False, 'Also write the reference PyTorch names.')
  flags.DEFINE_bool('overwrite', False, 'Write into an --out that holds other files or another '
                    "run's export (a model folder and the workdir itself are always refused).")
  flags.mark_flags_as_required(['workdir', 'out'])
  cli.run(main)
