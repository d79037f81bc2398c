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

from pplug_jax import (axis_rules, cli, fileio, generation, partitioning, system as system_lib,
                       validation)
from pplug_jax import flops as flops_lib
from pplug_jax.flops import CHIPS, Chip, generate_flops, train_step_flops
from pplug_jax.data import pipeline
from pplug_jax.errors import UserError
from pplug_jax.models import backbone

HEADROOM = 0.9  # plan to use at most 90 % of HBM: the runtime and fragmentation need the rest


def _quiet_libtpu(topology: str) -> None:
  """Tells libtpu this is no TPU VM, so it does not look for one (and warn at length), and that
  it need not take the chips' lock: the planner only compiles, so it runs beside a training job
  that holds the TPU and beside other plans (and leaves the lock free for the next job)."""
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
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


@dataclasses.dataclass(frozen=True)
class Workload:
  """How much a whole run does, for the ETAs: profile items (and queries) to embed and their
  mean encoder tokens, training examples before augmentation, and evaluation examples."""
  items: int = 0
  item_tokens: int = 512
  train_examples: int = 0
  eval_examples: int = 0


def etas(config, system: system_lib.System, workload: Workload, chips: int,
         peak_per_chip: float, train_step_flops_: float | None,
         generate_flops_: float | None) -> dict[str, Any]:
  """Seconds each stage takes at the chips' peak (a lower bound: divide by the MFU reached).

  Precompute: items x the encoder's FLOPs per item at `item_tokens` (at most
  data.item_max_length). Training: steps (examples with data.augment_copies copies each, as if
  every history had more than 2 items, x epochs, over the global step) x the step's FLOPs at the
  maximum lengths, so at most as many steps, each at most as long as bucketed.
  Evaluation: batches of config.train.eval_batch_size x one generation batch's FLOPs."""
  peak = chips * peak_per_chip
  per_item = flops_lib.encoder_flops_per_item(
      system_lib.encoder_config(config), min(workload.item_tokens, config.data.item_max_length))
  out: dict[str, Any] = {'workload': dataclasses.asdict(workload),
                         'encoder_flops_per_item': per_item,
                         'precompute_s': workload.items * per_item / peak}
  if train_step_flops_:
    per_step = config.optim.batch_size * config.optim.grad_accum
    examples = workload.train_examples * (1 + config.data.augment_copies) * config.optim.epochs
    steps = (config.optim.max_steps if config.optim.max_steps > 0 else
             max(1, examples // per_step))
    out.update(train_steps=steps, train_s=steps * train_step_flops_ / peak)
  if generate_flops_:
    batches = -(-workload.eval_examples // config.train.eval_batch_size)
    out.update(eval_batches=batches, eval_s=batches * generate_flops_ / peak)
  return out


def plan(config, topology: str, mesh_shape: tuple[int, ...] | None = None,
         generate: bool = True, workload: Workload | None = None) -> dict[str, Any]:
  """Compiles the train step and (unless `generate=False`) beam-search generation for
  `topology`; returns the plan, with ETAs when `workload` is given."""
  devices = topology_devices(topology)
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  if chip is None:
    raise UserError(f'--topology={topology!r}: device kind {kind!r} has no HBM/FLOP entry in '
                    'pplug_jax.flops.CHIPS; add it.')
  shape = tuple(mesh_shape or config.mesh_shape)
  validation.check_config(config, num_devices=len(devices),
                          process_count=1)  # batch / mesh divisibility on this topology
  resolved = partitioning.resolve_mesh_shape(shape, len(devices))
  mesh = Mesh(np.asarray(devices).reshape(resolved), axis_rules.MESH_AXES)
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
    _add_etas(out, config, system, workload, chip)
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
    _add_etas(out, config, system, workload, chip)
    return out
  gen_mem = system_lib.memory_summary(gen_compiled)
  gen_flops = generate_flops(system, config, batch)
  gen_fits, gen_advice = _verdict(gen_mem, chip)
  out['generate'] = {
      'per_chip_gib': gen_mem['total'], 'memory_gib': gen_mem, 'fits': gen_fits,
      'advice': gen_advice, 'compile_s': time.time() - start, 'flops': gen_flops,
      'batch': batch, 'num_beams': config.eval.num_beams,
      'step_time_lower_bound_s': gen_flops / (len(devices) * chip.peak_bf16_tflops * 1e12)}
  _add_etas(out, config, system, workload, chip)
  return out


def _add_etas(out: dict[str, Any], config, system: system_lib.System,
              workload: Workload | None, chip: Chip) -> None:
  if workload is not None:
    out['eta'] = etas(config, system, workload, out['chips'], chip.peak_bf16_tflops * 1e12,
                      out['train_step'].get('flops'), out.get('generate', {}).get('flops'))


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
  if 'eta' in p:
    e = p['eta']
    w = e['workload']
    parts = [f'precompute {_hours(e["precompute_s"])} ({w["items"]:,} items at '
             f'{w["item_tokens"]} tokens, {e["encoder_flops_per_item"] / 1e9:.0f} GFLOP each)']
    if 'train_s' in e:
      parts.append(f'training {_hours(e["train_s"])} ({e["train_steps"]:,} steps)')
    if 'eval_s' in e:
      parts.append(f'one evaluation {_hours(e["eval_s"])} ({e["eval_batches"]:,} batches)')
    lines.append('  ETA at peak (a lower bound; divide by the MFU reached): ' + '; '.join(parts))
  return '\n'.join(lines)


def _hours(seconds: float) -> str:
  return f'{seconds / 3600:.2f} h' if seconds >= 360 else f'{seconds / 60:.1f} min'


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
  workload = None
  if f.items or f.train_examples or f.eval_examples:
    workload = Workload(f.items, f.item_tokens, f.train_examples, f.eval_examples)
  result = plan(f.config, f.topology, mesh, workload=workload)
  print(format_plan(result), flush=True)
  if f.json:
    fileio.write_json(f.json, result)
  logging.info('plan written to %s', f.json or 'stdout')


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the TPU; run nothing locally
  cli.define_config()
  flags.DEFINE_string('topology', None, 'TPU topology, e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1.')
  flags.DEFINE_string('mesh', '', 'data,model mesh shape, e.g. 1,8 (default: config.mesh_shape).')
  flags.DEFINE_string('json', '', 'Also write the plan as JSON here.')
  flags.DEFINE_integer('items', 0, 'ETA: profile items and queries precompute embeds.')
  flags.DEFINE_integer('item_tokens', 512, 'ETA: their mean encoder tokens (at most 512).')
  flags.DEFINE_integer('train_examples', 0, 'ETA: training examples (before augmentation).')
  flags.DEFINE_integer('eval_examples', 0, 'ETA: examples of one evaluation.')
  flags.mark_flag_as_required('topology')
  cli.run(main)
