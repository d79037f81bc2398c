"""Plans a run for a TPU you do not have: AOT-compiles the real steps for a named topology.

    python -m pplug_jax.aot --config configs/lamp.py:task=2,size=xxl --topology v5e:2x4 \
        [--mesh 1,8] [--json PLAN.json]

Compiles the real train step and the real beam-search generation with abstract parameters (no
weights needed) against libtpu's description of the topology (`pip install -e '.[tpu]'`), on
any machine, CPU included. Prints per-device memory (arguments, outputs, temporaries) against
the device's HBM, whether it fits with headroom, the compile time, the model FLOPs of a step
(analytic: XLA's cost analysis counts a scanned layer once) and the step-time lower bound at the
chip's peak bf16 rate. When it does not fit, it says which knob to turn.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags

from pplug_jax import cli, fileio, generation, partitioning, system as system_lib, validation
from pplug_jax.data import pipeline
from pplug_jax.errors import UserError
from pplug_jax.models import backbone, decoder as decoder_lib, plug as plug_lib, t5 as t5_lib

@dataclasses.dataclass(frozen=True)
class Chip:
  """What one device of a topology has: HBM and peak dense bf16 FLOP/s (public specs)."""
  name: str
  hbm_gib: float
  peak_bf16_tflops: float


# Keyed by jax's device_kind. v4 topologies list each TensorCore as a device: half a chip.
CHIPS = {
    'TPU v4': Chip('v4 TensorCore (half a chip)', 16.0, 137.5),
    'TPU v5 lite': Chip('v5e', 16.0, 197.0),
    'TPU v5': Chip('v5p', 95.0, 459.0),
    'TPU v5p': Chip('v5p', 95.0, 459.0),
    'TPU v6 lite': Chip('v6e', 32.0, 918.0),
    'TPU v6e': Chip('v6e', 32.0, 918.0),
}
HEADROOM = 0.9  # plan to use at most 90 % of HBM: the runtime and fragmentation need the rest


def _quiet_libtpu(topology: str) -> None:
  """Tells libtpu this is no TPU VM, so it does not look for one (and warn at length)."""
  version, _, dims = topology.partition(':')
  chips = int(np.prod([int(x) for x in dims.split('x') if x.isdigit()] or [1]))
  accelerator = {'v4': f'v4-{2 * chips}', 'v5p': f'v5p-{2 * chips}',
                 'v5e': f'v5litepod-{chips}', 'v6e': f'v6e-{chips}'}.get(version)
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  if accelerator:
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', accelerator)


def topology_devices(name: str) -> list[Any]:
  """The devices of a TPU topology such as 'v5e:2x4' or 'v4:2x2x1', from libtpu."""
  import importlib.util
  if importlib.util.find_spec('libtpu') is None:
    raise UserError('planning for a TPU needs libtpu: pip install -e ".[tpu]" (it matches the '
                    'pinned jax).')
  _quiet_libtpu(name)
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
  except Exception as e:  # libtpu's own message names the problem
    raise UserError(f'--topology={name!r}: libtpu cannot describe it ({str(e).splitlines()[0]}). '
                    'Use names like v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4.') from None


def abstract_system(config, mesh: Mesh) -> system_lib.System:
  """The training loader's System with abstract weights: every frozen parameter a placed
  ShapeDtypeStruct, shapes from config.json or the published config of the named model."""
  return system_lib.load_system(config, system_lib.encoder_config(config).hidden_size, mesh,
                                abstract=True)


def _abstract_state(system: system_lib.System, tx, config) -> Any:
  if system.query_encoder is None:
    return jax.eval_shape(system_lib.init_state_fn(system, tx, config.seed))
  params = {'plug': _abstract_plug_params(system),
            'query_encoder': system.query_encoder_params}
  return {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
          'opt_state': jax.eval_shape(tx.init, params)}


def _abstract_plug_params(system: system_lib.System) -> Any:
  """The plug's parameter shapes, from the System's own initialiser (every plug variant)."""
  plug_only = dataclasses.replace(system, query_encoder=None, query_encoder_params=None)
  return jax.eval_shape(lambda: plug_only.init_trainable(0))['plug']


# ------------------------------------------------------------------ analytic FLOPs

def _t5_forward_flops(c: t5_lib.T5Config, enc_len: int, dec_len: int) -> float:
  """Forward FLOPs of one example: 2 x multiply-adds of every matmul, attention included."""
  inner = c.num_heads * c.d_kv
  ff = (3 if c.gated else 2) * c.d_model * c.d_ff
  enc_layer = enc_len * (4 * c.d_model * inner + ff) + 2 * enc_len * enc_len * inner
  dec_layer = (dec_len * (4 * c.d_model * inner + 2 * c.d_model * inner + ff) +
               enc_len * 2 * c.d_model * inner +            # cross-attention keys and values
               2 * dec_len * dec_len * inner + 2 * dec_len * enc_len * inner)
  head = dec_len * c.d_model * c.vocab_size
  return 2.0 * (c.num_encoder_layers * enc_layer + c.num_decoder_layers * dec_layer + head)


def _decoder_layers_flops(c: decoder_lib.DecoderConfig, tokens: int, keys: int) -> float:
  """FLOPs of every layer for `tokens` new positions attending over `keys` positions: q/k/v/o
  projections (grouped k/v), SwiGLU, and the two attention matmuls (computed in full)."""
  q = c.num_heads * c.head_dim
  kv = c.num_kv_heads * c.head_dim
  per_token = 2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
  return 2.0 * c.num_layers * (tokens * per_token + 2 * tokens * keys * q)


def _decoder_forward_flops(c: decoder_lib.DecoderConfig, length: int, head_positions: int
                           ) -> float:
  """Forward FLOPs of one sequence of `length`, with logits at `head_positions` of them."""
  return _decoder_layers_flops(c, length, length) + 2.0 * head_positions * c.hidden_size * \
      c.vocab_size


def _llm_forward_flops(c, input_len: int, target_len: int) -> float:
  """One teacher-forced example: T5's encoder input and decoder target, or the decoder-only
  sequence [input; target[:-1]] with logits at the target positions."""
  if isinstance(c, t5_lib.T5Config):
    return _t5_forward_flops(c, input_len, target_len)
  return _decoder_forward_flops(c, input_len + target_len - 1, target_len)


def train_step_flops(system: system_lib.System, config) -> float:
  """FLOPs of one optimizer step over micro-batch x accumulation examples.

  Frozen LLM: forward + the input-gradient half of the backward (no weight gradients), so
  2 x forward, plus one more forward of recomputation under remat. The plug's projector runs on
  every history item, forward + full backward (3 x forward).
  """
  c = system.llm.config
  d = config.data
  fwd = _llm_forward_flops(c, d.max_input_length + plug_lib.num_soft_tokens(config.plug),
                           d.max_target_length)
  llm = fwd * (3 if c.remat_policy != 'none' else 2)
  de, dl = system.encoder_dim, c.d_model
  plug = 3 * 2.0 * d.max_history * (de * dl + dl * dl)
  return (llm + plug) * config.optim.batch_size * config.optim.grad_accum


def generate_flops(system: system_lib.System, config, batch: int) -> float:
  """FLOPs of one generation batch with the decode cache.

  T5, per example: the encoder and the cross-attention keys/values once (beams share them); per
  beam and new token: the decoder's projections, feed-forward and LM head, self-attention over
  the cache (on average half the new tokens) and cross-attention over the input.
  Decoder-only, per example: the prefill of [I; P; prompt] with one row of logits; per beam and
  new token: the layers for one position over the prefix and the static cache (computed in
  full), and the LM head.
  """
  c = system.llm.config
  e = config.eval
  enc_len = config.data.max_input_length + plug_lib.num_soft_tokens(config.plug)
  new = e.num_beams * e.max_new_tokens
  if not isinstance(c, t5_lib.T5Config):
    prefill = _decoder_forward_flops(c, enc_len, 1)
    per_token = (_decoder_layers_flops(c, 1, enc_len + e.max_new_tokens) +
                 2.0 * c.hidden_size * c.vocab_size)
    return batch * (prefill + new * per_token)
  inner = c.num_heads * c.d_kv
  ff = (3 if c.gated else 2) * c.d_model * c.d_ff
  encoder = _t5_forward_flops(dataclasses.replace(c, num_decoder_layers=0), enc_len, 0)
  cross_kv = 2.0 * c.num_decoder_layers * enc_len * 2 * c.d_model * inner
  per_token = 2.0 * (c.num_decoder_layers * (6 * c.d_model * inner + ff +
                                             2 * (e.max_new_tokens / 2) * inner +
                                             2 * enc_len * inner) +
                     c.d_model * c.vocab_size)
  return batch * (encoder + cross_kv + new * per_token)


# ------------------------------------------------------------------ the plan

def _verdict(mem: dict[str, float], chip: Chip) -> tuple[bool, list[str]]:
  fits = mem['total'] <= HEADROOM * chip.hbm_gib
  advice = []
  if not fits:
    if mem['arguments'] > 0.4 * chip.hbm_gib:
      advice.append('the frozen weights dominate: widen the mesh model axis (--mesh 1,N, i.e. '
                    'config.mesh_shape=(1, N)) so they are split over more devices')
    if mem['temporaries'] > 0.4 * chip.hbm_gib:
      advice.append("activations dominate: use config.llm.remat_policy='full' (or "
                    "'dots_with_no_batch_dims'), and/or lower config.optim.batch_size while "
                    'raising config.optim.grad_accum by the same factor')
    if not advice:
      advice.append('lower config.optim.batch_size (raise config.optim.grad_accum), or use a '
                    'larger topology')
  return fits, advice


def _failed(error: Exception, seconds: float) -> dict[str, Any]:
  """A compile the TPU compiler refused: no memory figures, and what to try."""
  reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  return {'per_chip_gib': None, 'memory_gib': {}, 'fits': False, 'compile_s': seconds,
          'flops': None, 'step_time_lower_bound_s': None, 'error': reason,
          'advice': ['the compiler refused this shape (above); try another mesh (--mesh), '
                     "config.llm.remat_policy='full', or a smaller micro-batch"]}


def plan(config, topology: str, mesh_shape: tuple[int, ...] | None = None,
         generate: bool = True) -> dict[str, Any]:
  """Compiles the train step and (unless `generate=False`) beam-search generation for
  `topology`; returns the plan."""
  devices = topology_devices(topology)
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  if chip is None:
    raise UserError(f'--topology={topology!r}: device kind {kind!r} has no HBM/FLOP entry in '
                    'pplug_jax.aot.CHIPS; add it.')
  shape = tuple(mesh_shape or config.mesh_shape)
  validation.check_config(config, num_devices=len(devices),
                          process_count=1)  # batch / mesh divisibility on this topology
  resolved = partitioning.resolve_mesh_shape(shape, len(devices))
  mesh = Mesh(np.asarray(devices).reshape(resolved), partitioning.MESH_AXES)
  system = abstract_system(config, mesh)
  tx, _ = system_lib.build_optimizer(config, 1000)
  out: dict[str, Any] = {'topology': topology, 'chip': chip.name, 'device_kind': kind,
                         'chips': len(devices), 'mesh': list(resolved),
                         'hbm_per_chip_gib': chip.hbm_gib,
                         'backbone': f'{backbone.family(system.llm)} {config.llm.name}'}

  start = time.time()
  try:
    compiled, _, _ = system_lib.compile_train_step(
        system, tx, _abstract_state(system, tx, config), config)
  except Exception as e:  # the TPU compiler's own out-of-memory (e.g. VMEM) and the like
    out['train_step'] = _failed(e, time.time() - start)
  else:
    mem = system_lib.memory_summary(compiled)
    flops = train_step_flops(system, config)
    fits, advice = _verdict(mem, chip)
    out['train_step'] = {
        'per_chip_gib': mem['total'], 'memory_gib': mem, 'fits': fits, 'advice': advice,
        'compile_s': time.time() - start, 'flops': flops,
        'step_time_lower_bound_s': flops / (len(devices) * chip.peak_bf16_tflops * 1e12)}
  if not generate:
    return out

  start = time.time()
  generator = generation.SplitGenerator(system, config)
  batch = config.train.eval_batch_size
  shapes = pipeline.shapes(config, system.encoder_dim)
  abstract_batch = {
      k: jax.ShapeDtypeStruct((batch,) + s, jnp.float32 if pipeline.is_float(k) else jnp.int32,
                              sharding=partitioning.batch_sharding(mesh, system.rules,
                                                                   1 + len(s)))
      for k, s in shapes.items()}
  trainable = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=partitioning.replicated(mesh)),
      _abstract_state(system, tx, config)['params'])
  try:
    gen_compiled = generator.jitted(True).lower(trainable, system.llm_params,
                                                abstract_batch).compile()
  except Exception as e:
    out['generate'] = _failed(e, time.time() - start)
    return out
  gen_mem = system_lib.memory_summary(gen_compiled)
  gen_flops = generate_flops(system, config, batch)
  gen_fits, gen_advice = _verdict(gen_mem, chip)
  out['generate'] = {
      'per_chip_gib': gen_mem['total'], 'memory_gib': gen_mem, 'fits': gen_fits,
      'advice': gen_advice, 'compile_s': time.time() - start, 'flops': gen_flops,
      'batch': batch, 'num_beams': config.eval.num_beams,
      'step_time_lower_bound_s': gen_flops / (len(devices) * chip.peak_bf16_tflops * 1e12)}
  return out


def format_plan(p: dict[str, Any]) -> str:
  """The plan as a few readable lines."""
  lines = [f'{p["topology"]}: {p["chips"]} x {p["chip"]} ({p["hbm_per_chip_gib"]:.0f} GiB HBM '
           f'each), mesh (data, model) = {tuple(p["mesh"])}']
  for name in ('train_step', 'generate'):
    if name not in p:
      continue
    s = p[name]
    m = s['memory_gib']
    if 'error' in s:
      lines.append(f'  {name:10s} DOES NOT COMPILE: {s["error"]}')
      lines.extend(f'    to fit: {tip}' for tip in s['advice'])
      continue
    lines.append(
        f'  {name:10s} {s["per_chip_gib"]:6.2f} GiB per device (arguments {m["arguments"]:.2f}, '
        f'outputs {m["outputs"]:.2f}, temporaries {m["temporaries"]:.2f}) -> '
        f'{"fits" if s["fits"] else "DOES NOT FIT"} (limit {HEADROOM:.0%} of HBM); compiled in '
        f'{s["compile_s"]:.0f} s; {s["flops"] / 1e12:.1f} TFLOP; >= '
        f'{s["step_time_lower_bound_s"] * 1e3:.0f} ms at peak')
    for tip in s['advice']:
      lines.append(f'    to fit: {tip}')
  return '\n'.join(lines)


def parse_mesh(value: str) -> tuple[int, ...] | None:
  """--mesh 'data,model' (e.g. 1,8; -1 = the rest of the devices) as a shape; '' = None."""
  if not value:
    return None
  try:
    shape = tuple(int(x) for x in value.split(','))
  except ValueError:
    shape = ()
  if len(shape) != 2 or not all(n > 0 or n == -1 for n in shape):
    raise UserError(f'--mesh={value}: give two whole numbers, data,model (e.g. 1,8 or 8,1; -1 '
                    'takes the remaining devices).')
  return shape


def main(argv):
  del argv
  f = flags.FLAGS
  mesh = parse_mesh(f.mesh)
  if f.json and not os.path.isdir(os.path.dirname(os.path.abspath(f.json))):
    raise UserError(f'--json={f.json}: no folder {os.path.dirname(os.path.abspath(f.json))} to '
                    'write the plan into; make it first or give another path.')
  result = plan(f.config, f.topology, mesh)
  print(format_plan(result), flush=True)
  if f.json:
    fileio.write_json(f.json, result)
  logging.info('plan written to %s', f.json or 'stdout')


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the TPU; run nothing locally
  config_flags.DEFINE_config_file('config', None, 'configs/lamp.py[:args]', lock_config=True)
  flags.DEFINE_string('topology', None, 'TPU topology, e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1.')
  flags.DEFINE_string('mesh', '', 'data,model mesh shape, e.g. 1,8 (default: config.mesh_shape).')
  flags.DEFINE_string('json', '', 'Also write the plan as JSON here.')
  flags.mark_flags_as_required(['config', 'topology'])
  cli.run(main)
