"""LaMP metrics computed as the official evaluation does (scikit-learn and rouge_score)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from etils import epy

with epy.lazy_imports():  # rouge_score loads nltk and scipy (~1 s): only when scoring
  from rouge_score import rouge_scorer
  from sklearn import metrics as sk_metrics

from pplug_jax.data import lamp


def _label_index(labels: Sequence[str], x: str) -> int:
  try:
    return list(labels).index(x.strip())
  except ValueError:
    return -1  # an unknown label counts as its own wrong class


def _rating(pred: str, gold: str) -> tuple[float, bool]:
  """Parsed rating; an unparseable one becomes whichever of 1 and 5 is farther from gold."""
  try:
    value = float(pred)
    if math.isfinite(value):
      return value, True
  except ValueError:
    pass
  g = float(gold)
  return (1.0 if abs(1 - g) > abs(5 - g) else 5.0), False


def lamp_metrics(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict:
  """accuracy/f1 (LaMP-1, 2), mae/rmse (LaMP-3) or rouge-1/rouge-L (LaMP-4..7), plus counts."""
  spec = lamp.task_spec(task)
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions for {len(references)} references.')
  n = len(references)
  if spec.kind == 'classification':
    p = [_label_index(spec.labels, x) for x in predictions]
    g = [_label_index(spec.labels, x) for x in references]
    return {'accuracy': float(sk_metrics.accuracy_score(g, p)),
            'f1': float(sk_metrics.f1_score(g, p, labels=list(range(len(spec.labels))),
                                            average='macro', zero_division=0)),
            'unparseable': sum(i < 0 for i in p), 'count': n}
  if spec.kind == 'regression':
    parsed = [_rating(x.strip(), y.strip()) for x, y in zip(predictions, references)]
    p = [v for v, _ in parsed]
    g = [float(y) for y in references]
    return {'mae': float(sk_metrics.mean_absolute_error(g, p)),
            'rmse': float(np.sqrt(sk_metrics.mean_squared_error(g, p))),
            'unparseable': sum(not ok for _, ok in parsed), 'count': n}
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rougeL'])
  scores = [scorer.score(ref.strip(), pred.strip()) for pred, ref in zip(predictions, references)]
  return {'rouge-1': float(np.mean([s['rouge1'].fmeasure for s in scores])) if n else 0.0,
          'rouge-L': float(np.mean([s['rougeL'].fmeasure for s in scores])) if n else 0.0,
          'unparseable': 0, 'count': n}


def utilities(task: str, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
  """Per-example utility in [0, 1], higher is better, as the optimised baselines use it.

  Salemi et al. (SIGIR 2024; LaMP's `profile_item_utilization_scorer.py`, ROPG and RSPG):
  accuracy for LaMP-1/2, ROUGE-1 F for the generation tasks, and for LaMP-3 the absolute error
  turned into `(worst - |y_hat - y|) / worst` with `worst = max(|y - 1|, |y - 5|)`.
  """
  spec = lamp.task_spec(task)
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions for {len(references)} references.')
  if spec.kind == 'classification':
    return [float(_label_index(spec.labels, p) == _label_index(spec.labels, g))
            for p, g in zip(predictions, references)]
  if spec.kind == 'regression':
    out = []
    for p, g in zip(predictions, references):
      y = float(g)
      worst = max(abs(y - 1), abs(y - 5))
      out.append((worst - abs(_rating(p.strip(), g.strip())[0] - y)) / worst)
    return out
  scorer = rouge_scorer.RougeScorer(['rouge1'])
  return [scorer.score(g.strip(), p.strip())['rouge1'].fmeasure
          for p, g in zip(predictions, references)]
