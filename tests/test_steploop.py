"""The step loop every trainer runs (pplug_jax/steploop.py): which hooks run after which step,
a resumed start, a failed save stopping the run at the next step, batches that end early, and
everything closed however the loop ends."""

import pytest

from pplug_jax import steploop


class _Batches:
  """Batches 0, 1, 2, ... that record whether they were closed."""

  def __init__(self, n=None):
    self.n, self.i, self.closed = n, 0, False

  def __iter__(self):
    return self

  def __next__(self):
    if self.n is not None and self.i >= self.n:
      raise StopIteration
    self.i += 1
    return self.i - 1

  def close(self):
    self.closed = True


class _Saves:
  def __init__(self, fail_at=None):
    self.checked, self.fail_at = [], fail_at

  def check(self, step):
    self.checked.append(step)
    if step == self.fail_at:
      raise RuntimeError(f'save failed, seen at step {step}')


def _add(state, batch):
  return state + batch, 10 * batch  # outputs: what the step reports


def test_hooks_run_every_n_steps_and_after_the_last_from_a_resumed_step():
  calls = []
  hooks = (steploop.Every(1, lambda s, st, out: calls.append(('each', s, st, out))),
           steploop.Every(3, lambda s, st, out: calls.append(('third', s))))
  batches, saves = _Batches(), _Saves()
  state, step = steploop.run_steps(_add, 100, batches, start=2, total=7, desc='t',
                                   hooks=hooks, saves=saves)
  assert (state, step) == (100 + 0 + 1 + 2 + 3 + 4, 7)  # five steps: 3..7, batches 0..4
  assert [c for c in calls if c[0] == 'third'] == [('third', 3), ('third', 6), ('third', 7)]
  assert [c[1:] for c in calls if c[0] == 'each'] == [
      (3, 100, 0), (4, 101, 10), (5, 103, 20), (6, 106, 30), (7, 110, 40)]
  assert saves.checked == [2, 3, 4, 5, 6]  # after each step, before its count moves on
  assert batches.closed


def test_a_finished_run_makes_no_step():
  batches = _Batches()
  assert steploop.run_steps(_add, 5, batches, start=4, total=4, desc='t') == (5, 4)
  assert batches.i == 0 and batches.closed


def test_a_failed_save_stops_the_run_at_the_next_step_and_closes_the_batches():
  batches, ran = _Batches(), []
  with pytest.raises(RuntimeError, match='save failed, seen at step 3'):
    steploop.run_steps(_add, 0, batches, start=0, total=10, desc='t', saves=_Saves(fail_at=3),
                       hooks=(steploop.Every(1, lambda s, st, out: ran.append(s)),))
  assert ran == [1, 2, 3] and batches.closed


def test_batches_that_end_early_raise_the_callers_error_or_name_the_step():
  with pytest.raises(ValueError, match='no examples'):
    steploop.run_steps(_add, 0, _Batches(2), start=0, total=5, desc='t',
                       exhausted=lambda: ValueError('no examples'))
  with pytest.raises(RuntimeError, match='fit: the batches ended at step 2 of 5'):
    steploop.run_steps(_add, 0, _Batches(2), start=0, total=5, desc='fit')


def test_the_profiler_traces_its_window_and_ends_it_when_a_step_fails(monkeypatch, tmp_path):
  events = []
  monkeypatch.setattr(steploop.jax.profiler, 'start_trace', lambda d: events.append('start'))
  monkeypatch.setattr(steploop.jax.profiler, 'stop_trace', lambda: events.append('stop'))
  profiler = steploop.Profiler((2, 4), str(tmp_path))

  def step_fn(state, batch):
    events.append(batch)
    return state, None

  steploop.run_steps(step_fn, 0, _Batches(), start=0, total=6, desc='t', profiler=profiler)
  assert events == [0, 1, 'start', 2, 3, 'stop', 4, 5]  # steps 3 and 4 traced

  events.clear()

  def failing(state, batch):
    if batch == 3:
      raise FloatingPointError('nan')
    return step_fn(state, batch)

  with pytest.raises(FloatingPointError):
    steploop.run_steps(failing, 0, _Batches(), start=0, total=6, desc='t',
                       profiler=steploop.Profiler((2, 5), str(tmp_path)))
  assert events == [0, 1, 'start', 2, 'stop']


def test_the_bar_shows_the_loss_at_its_interval(monkeypatch):
  shown = []
  real_tqdm = steploop.tqdm

  class Bar(real_tqdm):
    def set_postfix(self, **kw):
      shown.append(kw)

  monkeypatch.setattr(steploop, 'tqdm', Bar)
  steploop.run_steps(_add, 0, _Batches(), start=0, total=5, desc='t', loss_of=lambda out: out,
                     show_loss_every=2)
  assert shown == [{'loss': '10.0000'}, {'loss': '30.0000'}, {'loss': '40.0000'}]
