"""table1.png is a chart people can read: no bar under the legend, each bar labelled with its
value, the paper's numbers as markers with --paper."""

import numpy as np

from pplug_jax import table
from pplug_jax.data import lamp


def _found():
  # PPlug's bar is the tallest of its group and reaches the top, where a legend inside the axes
  # used to sit
  return {('LaMP_2', 'flan-t5-xxl'): {
      'Ad-hoc': {'accuracy': 0.31, 'f1': 0.25}, 'BM25': {'accuracy': 0.52, 'f1': 0.40},
      'Recency': {'accuracy': 0.55, 'f1': 0.41}, 'Contriever': {'accuracy': 0.50, 'f1': 0.38},
      'PPlug': {'accuracy': 0.97, 'f1': 0.93}},
      ('LaMP_3', 'flan-t5-xxl'): {'Ad-hoc': {'mae': 0.40, 'rmse': 0.70},
                                  'PPlug': {'mae': 0.20, 'rmse': 0.45}}}


def _bars(ax):
  return [p for p in ax.patches if p.get_height() > 0]


def test_legend_covers_no_bar_and_every_bar_carries_its_value():
  fig = table.figure(_found())
  fig.canvas.draw()
  ax = fig.axes[0]
  legend = ax.get_legend().get_window_extent()
  bars = _bars(ax)
  assert len(bars) == 2 * 5 + 2 * 2
  for bar in bars:
    assert not legend.overlaps(bar.get_window_extent()), bar
  labels = sorted(float(t.get_text()) for t in ax.texts)
  assert labels == sorted(round(b.get_height(), 3) for b in bars)
  # the labels stay inside the axes
  box = ax.get_window_extent()
  for t in ax.texts:
    assert box.contains(*t.get_window_extent().corners()[1])


def test_paper_numbers_are_markers_on_their_methods_bars():
  fig = table.figure(_found(), paper=True)
  fig.canvas.draw()
  ax = fig.axes[0]
  points = np.concatenate([c.get_offsets() for c in ax.collections])
  found = _found()
  expected = []
  for (task, _), methods in sorted(found.items()):
    for key, _, _ in lamp.task_spec(task).table_metrics:
      for c in methods:
        expected.append(table.PAPER[(task, key)][table._PAPER_COLUMNS.index(c)])
  assert sorted(points[:, 1].round(3)) == sorted(expected)
  # each marker stands at the right edge of a bar of its own method, clear of its value label
  bars = _bars(ax)
  for x, y in points:
    bar = next(b for b in bars if b.get_x() < x < b.get_x() + b.get_width())
    assert x > bar.get_x() + 0.7 * bar.get_width()
  assert 'paper (FlanT5-XXL)' in [t.get_text() for t in ax.get_legend().get_texts()]
  legend = ax.get_legend().get_window_extent()
  for bar in _bars(ax):
    assert not legend.overlaps(bar.get_window_extent())


def test_chart_writes_a_png(tmp_path):
  path = tmp_path / 'table1.png'
  table.chart(_found(), str(path), paper=True)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
