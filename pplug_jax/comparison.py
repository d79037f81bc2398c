"""The demo's Table 1: the trained plug's ablations and the retrieval baselines on the same dev
split and frozen model, printed after training (`python -m pplug_jax.train` with config.demo).

An experiment over the jobs: it runs the baselines' job code and the table's layout, so it sits
above them; `train` (the entry) calls it, the training job knows nothing of it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from pplug_jax import partitioning, storage, table
from pplug_jax.baselines import ropg, rspg, runner, utility
from pplug_jax.data import lamp
from pplug_jax.models.text_encoder import TextEncoder

BASELINES = ('none', 'bm25', 'recency', 'contriever')
OPTIMIZED = ('ropg-rl', 'ropg-kd', 'rspg-pre', 'rspg-post')


def optimized_baselines(config, workdir: str, generator, mesh) -> dict[str, dict]:
  """ROPG-RL, ROPG-KD, RSPG-Pre and RSPG-Post on dev, trained on the demo's train split.

  Utility feedback for the top `config.ropg.candidates` items, both retrievers, the pool's runs
  on train, then both selectors; every step resumes (a finished one is reused).
  """
  utility.score(config, workdir, 'train', generator)
  out = {}
  for objective in ropg.OBJECTIVES:
    ropg.train(config, workdir, objective, mesh)
  for method in ('ropg-rl', 'ropg-kd'):
    out[method] = runner.run(config, workdir, method, config.rag.k, 'dev', generator, reuse=True)
  for kind in rspg.KINDS:
    out[f'rspg-{kind}'] = rspg.run(config, workdir, kind, 'dev', generator, mesh)
  return out


def compare(config, workdir: str, mesh, evaluate: Callable, params: dict,
            pplug_dev: dict) -> dict[str, Any]:
  """The demo's Table 1: ablations of the trained plug and the retrieval baselines, printed.

  Every method is evaluated on the same dev split with the same frozen base model; the demo's
  MiniLM is the dense retriever in Contriever's place.
  """
  out: dict[str, Any] = {
      'dev_no_persona': evaluate(None, desc='dev, frozen model without plug'),
      'dev_plug_persona_zeroed': evaluate(params, persona=False, desc='dev, persona zeroed')}
  config.rag.retriever_path = config.rag.retriever_path or config.encoder.path
  generator = runner.BaselineGenerator(config, mesh)  # one compile for every method
  encoder = TextEncoder(config.rag.retriever_path, config.rag.retriever_pooling, False)
  out['baselines'] = {m: runner.run(config, workdir, m, config.rag.k, 'dev', generator, encoder)
                      for m in BASELINES}
  if config.demo_optimized:
    out['baselines'].update(optimized_baselines(config, workdir, generator, mesh))
  with storage.open(os.path.join(lamp.task_dir(config.data.lamp_dir, config.task),
                         'synthetic_info.json')) as f:
    out['best_non_personalised_accuracy'] = json.load(f)['best_non_personalised_accuracy']
  if partitioning.is_main_process():
    columns = {table._column(os.path.basename(runner.method_dir(workdir, m, config.rag.k))): r
               for m, r in out['baselines'].items()}
    columns['PPlug'] = pplug_dev
    print(f'dev (synthetic {config.task}, {len(columns)} methods, same frozen model):\n' +
          table.markdown({(lamp.task_spec(config.task).name, config.llm.name): columns}), flush=True)
    rows = [('PPlug with the persona zeroed', out['dev_plug_persona_zeroed']),
            ('frozen model, no plug (PPlug input)', out['dev_no_persona'])]
    print('\n'.join(f'{name:38s} accuracy {m["accuracy"]:.4f}  macro-F1 {m["f1"]:.4f}  NLL '
                    f'{m["nll"]:.4f}' for name, m in rows))
    print(f'best possible without the user history (by construction): '
          f'{out["best_non_personalised_accuracy"]:.4f}', flush=True)
  return out
