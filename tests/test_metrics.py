"""LaMP metrics: hand-computed cases and random cases against the official recipe."""

import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

from pplug_jax.data import lamp
from pplug_jax.metrics import lamp_metrics


def test_classification_by_hand():
  # LaMP-1 labels [1], [2]; 'maybe' is unknown (-1): it is wrong and adds no class of its own
  m = lamp_metrics('LaMP_1', ['[1]', '[2]', 'maybe', '[1] '], ['[1]', '[1]', '[2]', '[1]'])
  assert m['accuracy'] == 0.5 and m['unparseable'] == 1 and m['count'] == 4
  # class [1]: tp 2, fp 0, fn 1 -> F1 0.8; class [2]: tp 0, fp 1, fn 1 -> 0; macro = 0.4
  assert m['f1'] == pytest.approx(0.4)


def test_lamp2_macro_f1_is_over_all_15_tags():
  m = lamp_metrics('LaMP_2', ['comedy', 'comedy'], ['comedy', 'comedy'])
  assert m['accuracy'] == 1.0
  assert m['f1'] == pytest.approx(1 / 15)  # 14 tags without support score 0 in the official F1


def test_regression_by_hand_with_unparseable():
  # 'abc' vs gold 2 -> 5 (farther); 'x' vs gold 4 -> 1; '3' vs 3 -> 0 error
  m = lamp_metrics('LaMP_3', ['abc', 'x', '3', '4.0'], ['2', '4', '3', '5'])
  errors = np.array([3.0, 3.0, 0.0, 1.0])
  assert m['mae'] == pytest.approx(errors.mean())
  assert m['rmse'] == pytest.approx(math.sqrt((errors**2).mean()))
  assert m['unparseable'] == 2


def test_rouge_by_hand():
  m = lamp_metrics('LaMP_4', ['the cat sat', 'a b c d'], ['the cat sat on the mat', 'a b c d'])
  # unigram P=1, R=3/6 -> F=2/3; LCS is also 3 tokens; second pair is perfect
  assert m['rouge-1'] == pytest.approx((2 / 3 + 1) / 2)
  assert m['rouge-L'] == pytest.approx((2 / 3 + 1) / 2)


def _official_classification(labels, preds, golds):
  """LaMP's evaluation: map to label indices (unknown -> -1), accuracy and macro F1."""
  def index(x):
    try:
      return labels.index(x.strip())
    except ValueError:
      return -1
  p, g = [index(x) for x in preds], [index(x) for x in golds]
  acc = sum(a == b for a, b in zip(p, g)) / len(g)
  f1 = f1_score(g, p, labels=list(range(len(labels))), average='macro', zero_division=0)
  return acc, f1


@pytest.mark.parametrize('seed', range(5))
def test_random_cases_match_the_official_recipe(seed):
  rng = np.random.default_rng(seed)
  labels = list(lamp.task_spec('LaMP_2').labels)
  pool = labels + ['unknown tag', '']
  golds = [labels[i] for i in rng.integers(0, len(labels), 60)]
  preds = [pool[i] for i in rng.integers(0, len(pool), 60)]
  m = lamp_metrics('LaMP_2', preds, golds)
  acc, f1 = _official_classification(labels, preds, golds)
  assert m['accuracy'] == pytest.approx(acc) and m['f1'] == pytest.approx(f1)

  ratings = [str(x) for x in rng.integers(1, 6, 40)]
  noisy = [r if rng.random() < 0.7 else rng.choice(['five', '', '3.5', 'n/a']) for r in ratings]
  truth = [str(x) for x in rng.integers(1, 6, 40)]
  m = lamp_metrics('LaMP_3', noisy, truth)
  vals = []
  for p, g in zip(noisy, truth):
    try:
      vals.append(float(p))
    except ValueError:
      vals.append(1.0 if abs(1 - float(g)) > abs(5 - float(g)) else 5.0)
  err = np.array(vals) - np.array([float(t) for t in truth])
  assert m['mae'] == pytest.approx(np.abs(err).mean())
  assert m['rmse'] == pytest.approx(np.sqrt((err**2).mean()))

  words = 'the a cat dog sat ran on under mat rug quickly'.split()
  refs = [' '.join(rng.choice(words, rng.integers(3, 9))) for _ in range(30)]
  hyps = [' '.join(rng.choice(words, rng.integers(1, 9))) for _ in range(30)]
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rougeL'])
  s = [scorer.score(r, h) for r, h in zip(refs, hyps)]
  m = lamp_metrics('LaMP_7', hyps, refs)
  assert m['rouge-1'] == pytest.approx(np.mean([x['rouge1'].fmeasure for x in s]))
  assert m['rouge-L'] == pytest.approx(np.mean([x['rougeL'].fmeasure for x in s]))
