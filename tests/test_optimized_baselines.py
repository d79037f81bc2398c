"""ROPG-KD, ROPG-RL and RSPG against PyTorch transcriptions of the reference's equations.

The transcriptions are written here from LaMP-Benchmark/LaMP's `ROPG/trainers/trainer.py` and
`RSPG/modeling/modeling.py` (not imported): KD's `CrossEntropyLoss(softmax(s / T),
softmax(u / T))` and the paper's KL, RL's `-sum(log p(sampled) * (u(sampled) - u(0))) / (B * 1)`,
and RSPG's `KLDivLoss(batchmean)(log_softmax(s) / T, softmax(u))`.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lamp as lamp_config
from conftest import ROOT
from pplug_jax import metrics
from pplug_jax.baselines import ropg, rspg, trainer, utility
from pplug_jax.data import lamp

torch = pytest.importorskip('torch')
F = torch.nn.functional

B, L, D, T = 5, 6, 8, 2.0


def _toy(seed=0):
  """A tiny retriever (scores = q W d^T) and its inputs, as numpy."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(D, D)).astype(np.float32) * 0.5,
          rng.normal(size=(B, D)).astype(np.float32), rng.normal(size=(B, L, D)).astype(np.float32),
          rng.uniform(size=(B, L)).astype(np.float32))


def _jax_scores(w, q, d):
  return jnp.einsum('bd,de,ble->bl', q, w, d)


def _torch_scores(w, q, d):
  return torch.einsum('bd,de,ble->bl', q, w, d)


def _torch_kd(scores, u, temperature, form):
  if form == 'reference':  # ROPG/trainers/trainer.py, KDReaderToRetrieverTrainer
    probs = torch.softmax(scores / temperature, dim=-1)
    return torch.nn.CrossEntropyLoss()(probs, torch.softmax(u / temperature, dim=-1))
  return F.kl_div(F.log_softmax(scores / temperature, -1), F.softmax(u / temperature, -1),
                  reduction='batchmean')


@pytest.mark.parametrize('form', ['kl', 'reference'])
def test_kd_loss_and_gradients_match_the_torch_transcription(form):
  w, q, d, u = _toy()
  loss, grad = jax.value_and_grad(
      lambda w: ropg.kd_loss(_jax_scores(w, q, d), jnp.asarray(u), T, form))(jnp.asarray(w))
  tw = torch.tensor(w, requires_grad=True)
  tloss = _torch_kd(_torch_scores(tw, torch.tensor(q), torch.tensor(d)), torch.tensor(u), T, form)
  tloss.backward()
  assert abs(float(loss) - tloss.item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(grad), tw.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_the_two_kd_forms_differ():
  """The code's form is not the paper's KL (it softmaxes twice): the flag matters."""
  _, _, _, u = _toy()
  s = jnp.asarray(np.random.default_rng(1).normal(size=(B, L)) * 3, jnp.float32)
  assert abs(float(ropg.kd_loss(s, u, T, 'kl')) - float(ropg.kd_loss(s, u, T, 'reference'))) > .1


def test_rl_loss_gradients_and_reward_sign_match_the_torch_transcription():
  w, q, d, u = _toy()
  valid = np.ones((B, L), bool)
  valid[0, 4:] = False  # a padded candidate: the reference's gold stays 0 there
  sampled = np.array([4, 1, 0, 5, 2])
  loss, grad = jax.value_and_grad(lambda w: ropg.rl_loss(
      _jax_scores(w, q, d), jnp.asarray(u), jnp.asarray(valid), jnp.asarray(sampled)))(
          jnp.asarray(w))
  tw = torch.tensor(w, requires_grad=True)
  probs = torch.softmax(_torch_scores(tw, torch.tensor(q), torch.tensor(d)), dim=-1)
  tu = torch.tensor(u)
  gold = torch.where(torch.tensor(valid), tu - tu[:, :1], torch.zeros_like(tu))
  idx = torch.tensor(sampled)[:, None]
  p, r = torch.gather(probs, 1, idx), torch.gather(gold, 1, idx)
  tloss = -torch.sum(torch.log(p) * r) / (p.shape[0] * p.shape[1])
  tloss.backward()
  assert abs(float(loss) - tloss.item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(grad), tw.grad.numpy(), atol=1e-5, rtol=1e-5)

  # The sign: a gradient step raises the sampled item's probability when it beat the top-1 of
  # the initial ranking, and lowers it when it did worse.
  scores = jnp.zeros((2, 3))
  util = jnp.array([[0.2, 0.9, 0.0], [0.8, 0.1, 0.0]])
  g = jax.grad(lambda s: ropg.rl_loss(s, util, jnp.ones((2, 3), bool), jnp.array([1, 1])))(scores)
  assert g[0, 1] < 0 < g[1, 1]  # descent raises row 0's item 1 and lowers row 1's


@pytest.mark.parametrize('form,temperature', [('kl', 2.0), ('reference', 2.0), ('kl', 1.0)])
def test_rspg_loss_and_gradients_match_the_torch_transcription(form, temperature):
  rng = np.random.default_rng(3)
  w = rng.normal(size=(D,)).astype(np.float32)
  x = rng.normal(size=(B, 6, D)).astype(np.float32)
  labels = rng.uniform(size=(B, 6)).astype(np.float32)
  loss, grad = jax.value_and_grad(lambda w: rspg.rspg_loss(
      jnp.einsum('brd,d->br', x, w), jnp.asarray(labels), temperature, form))(jnp.asarray(w))
  tw = torch.tensor(w, requires_grad=True)
  out = torch.einsum('brd,d->br', torch.tensor(x), tw)
  tl = torch.tensor(labels)
  if form == 'reference':  # RSPG/modeling/modeling.py, Trainer.forward
    tloss = torch.nn.KLDivLoss(reduction='batchmean')(F.log_softmax(out, dim=-1) / temperature,
                                                      F.softmax(tl, dim=-1))
  else:
    tloss = F.kl_div(F.log_softmax(out / temperature, -1), F.softmax(tl / temperature, -1),
                     reduction='batchmean')
  tloss.backward()
  assert abs(float(loss) - tloss.item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(grad), tw.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_utilities_follow_the_reference():
  assert metrics.utilities('LaMP_2', ['comedy', 'sci-fi ', 'nonsense'],
                           ['comedy', 'sci-fi', 'comedy']) == [1.0, 1.0, 0.0]
  # LaMP-3: (worst - |y_hat - y|) / worst, worst = max(|y - 1|, |y - 5|); unparseable = worst.
  got = metrics.utilities('LaMP_3', ['4', '1', 'five', '2'], ['4', '4', '2', '5'])
  assert got == pytest.approx([1.0, 0.0, 0.0, 0.25])
  from rouge_score import rouge_scorer
  want = rouge_scorer.RougeScorer(['rouge1']).score('the cat sat', 'a cat sat down')
  assert metrics.utilities('LaMP_7', ['a cat sat down'], ['the cat sat']) == [
      pytest.approx(want['rouge1'].fmeasure)]


def test_epoch_order_is_a_seeded_permutation():
  a = trainer.epoch_order(0, 1, 50)
  assert sorted(a) == list(range(50)) and (a == trainer.epoch_order(0, 1, 50)).all()
  assert (a != trainer.epoch_order(0, 2, 50)).any() and (a != trainer.epoch_order(1, 1, 50)).any()


# ------------------------------------------------------------ ROPG-KD on a toy with known utility

_WORDS = ('river stone cloud paper window garden bottle engine forest candle mirror rocket '
          'pillow ladder violin basket tunnel pepper castle meadow').split()


def _toy_users(rng, n, prefix):
  """LaMP-2 users whose 4 items are random words; one of them mentions 'golden treasure'."""
  questions, golds = [], []
  for u in range(n):
    good = int(rng.integers(4))
    profile = []
    for j in range(4):
      words = list(rng.choice(_WORDS, 6))
      if j == good:
        words[int(rng.integers(6))] = 'golden treasure'
      profile.append({'id': f'{prefix}{u}_{j}', 'description': ' '.join(words), 'tag': 'comedy',
                      'date': f'2020-01-0{j + 1}'})
    questions.append({'id': f'{prefix}{u}', 'profile': profile, 'input': (
        'Which tag does this movie relate to among the following tags? Just answer with the tag '
        'name without further explanation. tags: [sci-fi, comedy] description: '
        + ' '.join(rng.choice(_WORDS, 5)))})
    golds.append({'id': f'{prefix}{u}', 'output': 'comedy'})
  return questions, golds


def _top1_hit_rate(questions, encoder):
  from pplug_jax.baselines import rank_profile
  hits = [('golden' in rank_profile('LaMP_2', q['input'], q['profile'], 'ropg-kd', 1,
                                    encoder)[0]['description']) for q in questions]
  return float(np.mean(hits))


@pytest.mark.slow
def test_ropg_kd_moves_the_top1_towards_high_utility_items(tmp_path, minilm_path):
  """Utility 1 for the item that mentions 'golden treasure', 0 for the others: after KD the
  trained retriever ranks that item first for users it never saw."""
  from pplug_jax.models.text_encoder import TextEncoder
  rng = np.random.default_rng(0)
  lamp_dir = tmp_path / 'lamp' / 'LaMP_2'
  lamp_dir.mkdir(parents=True)
  train_q, train_g = _toy_users(rng, 64, 't')
  held_out, _ = _toy_users(rng, 60, 'h')
  (lamp_dir / 'train_questions.json').write_text(json.dumps(train_q))
  (lamp_dir / 'train_outputs.json').write_text(json.dumps({'task': 'LaMP_2', 'golds': train_g}))
  workdir = tmp_path / 'work'
  os.makedirs(workdir / 'ropg')
  with open(utility.paths(str(workdir), 'train')[0], 'w') as f:
    for q in train_q:
      u = [float('golden' in item['description']) for item in q['profile']]
      f.write(json.dumps({'id': q['id'], 'candidates': [0, 1, 2, 3], 'item_ids': [
          i['id'] for i in q['profile']], 'outputs': ['comedy'] * 4, 'utility': u}) + '\n')
  config = lamp_config.get_config('task=2,size=small')
  config.data.lamp_dir = str(tmp_path / 'lamp')
  config.rag.retriever_path = str(minilm_path)
  config.ropg.update(candidates=4, lr=1e-4, batch_size=8, epochs=3, query_max_length=32,
                     doc_max_length=32, dropout=0.0)
  before = _top1_hit_rate(held_out, TextEncoder(minilm_path, 'mean', False))
  out = ropg.train(config, str(workdir), 'kd')
  after = _top1_hit_rate(held_out, TextEncoder(out, 'mean', False))
  assert before < 0.5 and after >= 0.9, (before, after)
  result = json.loads((workdir / 'ropg' / 'kd' / 'train_result.json').read_text())
  assert result['steps'] == 3 * (64 // 8) and result['last_loss'] < result['first_loss']


# ------------------------------------------------------------ the utility scorer after SIGKILL

def _utility_cmd(workdir):
  return [sys.executable, '-m', 'pplug_jax.baselines.utility', '--config',
          'configs/lamp.py:demo', f'--workdir={workdir}', '--config.demo_model.pretrain_steps=0',
          '--config.ropg.candidates=4', '--config.ropg.initial_ranker=bm25']


@pytest.mark.slow
def test_utility_scorer_resumes_after_sigkill_with_no_query_twice_or_lost(tmp_path):
  workdir = tmp_path / 'w'
  out_file, _ = utility.paths(str(workdir), 'train')
  proc = subprocess.Popen(_utility_cmd(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(out_file) and os.path.getsize(out_file) > 0:
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.stderr.read()[-3000:]  # still running: killed mid-way
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with open(out_file, 'a') as f:  # a line the kill tore in half
    f.write('{"id": "torn", "candi')
  before = [json.loads(line) for line in open(out_file).read().splitlines()[:-1]]
  questions = json.load(open(workdir / 'demo' / 'lamp' / 'LaMP_2' / 'train_questions.json'))
  assert 0 < len(before) < len(questions)

  done = subprocess.run(_utility_cmd(workdir), cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [json.loads(line) for line in open(out_file).read().splitlines()]
  assert [d['id'] for d in lines] == [q['id'] for q in questions]  # each once, in order
  assert lines[:len(before)] == before

  # The resumed file equals an uninterrupted run's, line for line.
  from pplug_jax import demo
  config = lamp_config.get_config('demo')
  config.demo_model.pretrain_steps = 0
  config.ropg.update(candidates=4, initial_ranker='bm25')
  demo.prepare(config, str(workdir))
  fresh = utility.score(config, str(tmp_path / 'fresh'), 'train')
  assert open(fresh).read() == open(out_file).read()
  for d in lines:
    assert len(d['candidates']) == min(4, len(questions[lines.index(d)]['profile']))
    assert all(0.0 <= u <= 1.0 for u in d['utility'])


# ------------------------------------------------------------ RSPG end to end (small)

@pytest.mark.slow
def test_rspg_picks_one_pool_output_per_query_writes_lamp_files_and_resumes(tmp_path,
                                                                          minilm_path):
  """On a small demo (random base model, three cheap retrievers), both selectors train, pick
  one retriever per dev query and return exactly that retriever's saved output; a second run
  reuses the finished training and the pool's runs."""
  from pplug_jax import demo
  from pplug_jax.baselines import runner
  config = lamp_config.get_config('demo')
  config.demo_model.pretrain_steps = 0
  config.demo_data.update(train_users=48, dev_users=16, test_users=4)
  config.rspg.update(retrievers=('none', 'bm25', 'recency'), model_path=str(minilm_path),
                     max_length=32, batch_size=8, epochs=1)
  workdir = str(tmp_path)
  demo.prepare(config, workdir)
  for kind in rspg.KINDS:
    result = rspg.run(config, workdir, kind, 'dev')
    out = runner.method_dir(workdir, f'rspg-{kind}', config.rag.k)
    preds = json.load(open(os.path.join(out, 'predictions_dev.json')))
    pool = {m: runner.load_run(workdir, m, config.rag.k, 'dev')['predictions']
            for m in config.rspg.retrievers}
    _, questions, examples = lamp.raw_questions(config, 'dev')
    assert [p['id'] for p in preds['golds']] == [q['id'] for q in questions]
    for p in preds['golds']:
      assert p['output'] == pool[p['retriever']][p['id']]
    assert sum(result['chosen'].values()) == len(questions) == result['count']
    golds = {e.id: e.output for e in examples}
    assert result['accuracy'] == metrics.lamp_metrics(
        'LaMP_2', [p['output'] for p in preds['golds']],
        [golds[p['id']] for p in preds['golds']])['accuracy']
    assert result['train']['steps'] == 48 // 8
    again = rspg.run(config, workdir, kind, 'dev')
    assert again['train']['steps'] == 0 and again['accuracy'] == result['accuracy']


def test_bad_settings_of_the_optimised_baselines_name_their_key(tmp_path):
  """Each is refused before any model or data is loaded, naming the config key or flag."""
  from pplug_jax.errors import ConfigError
  config = lamp_config.get_config('task=2,size=small')
  config.rag.retriever_path = str(tmp_path)  # never read: the checks come first
  cases = [
      (lambda c: c.ropg.update(kd_form='kld'), lambda c: ropg.train(c, str(tmp_path), 'kd'),
       "config.ropg.kd_form='kld': use one of ['kl', 'reference']."),
      (lambda c: None, lambda c: ropg.train(c, str(tmp_path), 'ppo'),
       "--objective='ppo': use one of ('kd', 'rl')"),
      (lambda c: c.ropg.update(initial_ranker='dense'),
       lambda c: utility.score(c, str(tmp_path)),
       "config.ropg.initial_ranker='dense': use one of ['bm25', 'contriever', 'file', 'recency']."),
      (lambda c: c.ropg.update(candidates=0), lambda c: utility.score(c, str(tmp_path)),
       'config.ropg.candidates=0: must be > 0.'),
      (lambda c: c.rspg.update(loss_form='ce'), lambda c: rspg.run(c, str(tmp_path), 'pre'),
       "config.rspg.loss_form='ce': use one of ['kl', 'reference']."),
      (lambda c: c.rspg.update(retrievers=('bm25', 'bm52')),
       lambda c: rspg.run(c, str(tmp_path), 'pre'),
       "config.rspg.retrievers=('bm25', 'bm52'): give at least two of ['none', 'bm25', "
       "'recency', 'contriever', 'random', 'ropg-kd', 'ropg-rl']."),
      (lambda c: None, lambda c: rspg.run(c, str(tmp_path), 'mid'),
       "--kind='mid': use one of ('pre', 'post')"),
  ]
  for change, call, message in cases:
    c = config.copy_and_resolve_references()
    change(c)
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')
                       .replace('[', r'\[').replace(']', r'\]')):
      call(c)
  assert not os.listdir(tmp_path)  # nothing written
