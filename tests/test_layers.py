"""The package's layers: each module imports only its own layer or the ones below, with no
cycle, and never imports the package's own modules inside a function.

Every import is read from the source (`ast`), top-level or not, so an import hidden in a
function or under `if TYPE_CHECKING:` counts like any other. A new module must be given a
layer here; the README's "Layout" section shows the same table.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

from conftest import ROOT

PACKAGE = 'pplug_jax'

# bottom to top; a module may import its own layer and the layers before it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ('core: errors, files, checkpoints, devices', (
        '', 'errors', 'axis_rules', 'storage', 'fileio', 'scalars', 'workdir_lock', 'checkpoints',
        'partitioning')),
    ('data: LaMP files, records, pipeline, tokenizers, metrics, features, LaMP retrieval', (
        'data', 'data.tasks', 'data.buckets', 'data.lamp', 'data.longlamp', 'data.lamp_tfds',
        'data.pipeline', 'data.records',
        'data.synthetic', 'tokenizers', 'metrics', 'features', 'baselines',
        'baselines.prompts', 'baselines.retrieval')),
    ('models', (
        'models', 'models.backbone', 'models.bert', 'models.decoder', 'models.hf_weights',
        'models.known_configs', 'models.layers', 'models.numerics', 'models.plug',
        'models.stack', 'models.t5', 'models.text_encoder')),
    ('system: assembly, optimisation, steps, the config check', (
        'system', 'flops', 'validation', 'steploop')),
    ('generation', ('decoding', 'generation')),
    ("command plumbing: the demo's inputs and cli (which knows no job)", ('demo', 'cli')),
    ('jobs', (
        'training', 'evaluate', 'export', 'precompute', 'inference', 'aot',
        'baselines.runner', 'baselines.trainer', 'baselines.utility', 'baselines.ropg',
        'baselines.rspg')),
    ("experiments: the demo's Table 1, the ablation study, the tables", (
        'comparison', 'ablate', 'table')),
    ('entries', ('train', 'baselines.__main__')),
]


def package_modules(root: str) -> dict[str, str]:
  """{module name relative to the package ('' for the package itself): its file}."""
  out = {}
  base = os.path.join(root, PACKAGE)
  for folder, _, files in os.walk(base):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, name[:-3]), base).replace(os.sep, '.')
        out['' if rel == '__init__' else rel.removesuffix('.__init__')] = os.path.join(
            folder, name)
  return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             known: set[str]) -> list[str]:
  """The package modules an import statement names (relative to the package)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    base = node.module or ''
    if node.level:  # relative: from the importing module's package
      parts = [PACKAGE] + ([p for p in module.split('.') if p] if module else [])
      if not is_package:
        parts = parts[:-1]
      parts = parts[:len(parts) - node.level + 1]
      base = '.'.join(parts + ([base] if base else []))
    names = [f'{base}.{a.name}' for a in node.names]
    names = [n if n.removeprefix(PACKAGE + '.') in known else base for n in names]
  out = []
  for name in names:
    if name == PACKAGE or name.startswith(PACKAGE + '.'):
      rel = name.removeprefix(PACKAGE).removeprefix('.')
      while rel and rel not in known:  # `import pplug_jax.data.lamp.X` -> data.lamp
        rel = rel.rpartition('.')[0]
      out.append(rel)
  return out


def import_edges(root: str) -> tuple[dict[str, set[str]], list[str]]:
  """({module: the package modules it imports}, ['file:line: module imports X in a function'])."""
  modules = package_modules(root)
  edges: dict[str, set[str]] = {m: set() for m in modules}
  in_functions = []
  for module, path in modules.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    is_package = path.endswith('__init__.py')

    def visit(node: ast.AST, in_function: bool) -> None:
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
          targets = _targets(child, module, is_package, set(modules))
          edges[module].update(t for t in targets if t != module)
          if targets and in_function:
            in_functions.append(f'{os.path.relpath(path, root)}:{child.lineno}: imports '
                                f'{", ".join(targets) or PACKAGE} inside a function')
        visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                       ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
  return edges, in_functions


def layer_problems(edges: dict[str, set[str]],
                   layers: list[tuple[str, tuple[str, ...]]]) -> list[str]:
  """Every module without a layer, every import of a higher layer, and every cycle."""
  level = {m: i for i, (_, members) in enumerate(layers) for m in members}
  show = lambda m: f'{PACKAGE}.{m}' if m else PACKAGE
  problems = [f'{show(m)} has no layer: add it to LAYERS in tests/test_layers.py (and the '
              'README\'s layout)' for m in sorted(edges) if m not in level]
  for m in sorted(edges):
    for t in sorted(edges[m]):
      if m in level and t in level and level[t] > level[m]:
        problems.append(f'{show(m)} (layer {level[m] + 1}, {layers[level[m]][0]}) imports '
                        f'{show(t)} (layer {level[t] + 1}, {layers[level[t]][0]}), a higher one')
  state: dict[str, int] = {}  # 1 on the current path, 2 done

  def walk(m: str, path: list[str]) -> None:
    state[m] = 1
    for t in sorted(edges.get(m, ())):
      if state.get(t) == 1:
        cycle = path[path.index(t):] + [t]
        problems.append('import cycle: ' + ' -> '.join(show(c) for c in cycle))
      elif t not in state:
        walk(t, path + [t])
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      walk(m, [m])
  return problems


def test_every_module_imports_only_its_layer_or_below_without_cycles():
  edges, _ = import_edges(ROOT)
  assert layer_problems(edges, LAYERS) == []


def test_no_module_imports_the_package_inside_a_function():
  _, in_functions = import_edges(ROOT)
  assert in_functions == []


def test_the_layer_table_names_only_modules_that_exist():
  modules = set(package_modules(ROOT))
  named = [m for _, members in LAYERS for m in members]
  assert len(named) == len(set(named))
  assert sorted(set(named) - modules) == []


def readme_layout(readme: str) -> dict[int, set[str]]:
  """{layer number: the .py files its rows of the README's "Layout" block name}."""
  block = readme.split('## Layout', 1)[1].split('```', 2)[1]
  files: dict[int, set[str]] = {}
  layer = None
  for line in block.splitlines():
    head = line.split(maxsplit=1)
    if head and head[0].isdigit():
      layer = int(head[0])
    elif line and not line.startswith(' '):  # configs/, scripts/, tests/: outside the package
      layer = None
    if layer is not None:
      files.setdefault(layer, set()).update(re.findall(r'[\w/]+\.py', line))
  return files


def test_the_readmes_layout_shows_every_module_in_its_layer():
  """The README's table is this file's: each layer's row names exactly its modules' files
  (packages' __init__.py aside)."""
  modules = package_modules(ROOT)
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    shown = readme_layout(f.read())
  expected = {n + 1: {os.path.relpath(modules[m], os.path.join(ROOT, PACKAGE)).replace(
      os.sep, '/') for m in members if not modules[m].endswith('__init__.py')}
      for n, (_, members) in enumerate(LAYERS)}
  assert shown == expected


@pytest.mark.parametrize('source, expected', [
    # an upward import: the data layer reaching a job
    ({'data/lamp.py': 'from pplug_jax import training\n'},
     ['pplug_jax.data.lamp (layer 2, data) imports pplug_jax.training (layer 3, jobs), '
      'a higher one']),
    # a cycle inside one layer
    ({'data/lamp.py': 'from pplug_jax.data import records\n',
      'data/records.py': 'from . import lamp\n'},
     ['import cycle: pplug_jax.data.lamp -> pplug_jax.data.records -> pplug_jax.data.lamp']),
    ({'data/lamp.py': '', 'data/records.py': '', 'training.py': '', 'extra.py': ''},
     ['pplug_jax.extra has no layer: add it to LAYERS in tests/test_layers.py (and the '
      "README's layout)"]),
])
def test_the_check_finds_an_upward_import_a_cycle_and_a_module_without_layer(
    tmp_path, source, expected):
  """The checker on a made-up package: what it reports, exactly."""
  files = {'__init__.py': '', 'data/__init__.py': '', 'data/lamp.py': '',
           'data/records.py': '', 'training.py': '', **source}
  for name, text in files.items():
    path = tmp_path / PACKAGE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  layers = [('core', ('', 'data')), ('data', ('data.lamp', 'data.records')),
            ('jobs', ('training',))]
  edges, _ = import_edges(str(tmp_path))
  assert layer_problems(edges, layers) == expected


def test_an_import_inside_a_function_is_reported(tmp_path):
  path = tmp_path / PACKAGE / 'training.py'
  path.parent.mkdir(parents=True)
  (tmp_path / PACKAGE / '__init__.py').write_text('')
  path.write_text('import os\n\ndef f():\n  import json\n  from pplug_jax import training\n'
                  '  return os, json\n')
  _, in_functions = import_edges(str(tmp_path))
  assert in_functions == [f'{os.path.join(PACKAGE, "training.py")}:5: imports training inside '
                          'a function']


# Libraries that take seconds to load: TensorFlow (with Keras, scipy, matplotlib: ~4 s),
# torch (tensorboardX loads it where installed: ~1.4 s), rouge_score (nltk, scipy: ~1 s).
HEAVY = ('tensorflow', 'tensorflow_datasets', 'keras', 'torch', 'nltk', 'scipy', 'sklearn',
         'matplotlib', 'transformers')
ENTRIES = ('train', 'evaluate', 'export', 'precompute', 'inference', 'aot', 'table', 'ablate',
           'baselines.ropg', 'baselines.rspg', 'baselines.utility', 'baselines.__main__')


def test_entry_modules_load_no_heavy_library_until_it_is_used():
  """A command's flag or config error is one line in about 2 s, not 10: the heavy libraries
  load when first used (etils' lazy imports), and a real use still loads them."""
  import subprocess
  import sys
  code = (f'import importlib, sys\n'
          f'for m in {ENTRIES!r}: importlib.import_module("{PACKAGE}." + m)\n'
          f'print(sorted(h for h in {HEAVY!r} if h in sys.modules))\n'
          f'from {PACKAGE} import metrics\n'
          f'from {PACKAGE}.data import records\n'
          f'metrics.lamp_metrics("LaMP_4", ["a b"], ["a c"])\n'
          f'metrics.lamp_metrics("LaMP_3", ["3"], ["4"]); records.parse_fn(4, "float32")\n'
          f'print(sorted(h for h in ("tensorflow", "nltk", "sklearn") if h in sys.modules))\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split('\n')[:2] == ['[]', "['nltk', 'sklearn', 'tensorflow']"]
