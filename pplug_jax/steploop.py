"""The step loop every trainer runs: the plug's training job, ROPG's retrievers and RSPG's
selectors (`baselines/trainer.py`), and the demo's fitting of its tiny base model.

One loop owns what they share: the progress bar, the step count from a resumed step, a failed
checkpoint save stopping the run at the next step (not an interval later), the profiler window,
and the periodic hooks (logging, evaluation, checkpoints), each run after every N steps and
always after the last. What differs is passed in: the jitted step, the batches and the hooks.
The loop adds no host sync: a hook that reads a value back decides when.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
from absl import logging
from tqdm.auto import tqdm

from pplug_jax import partitioning

# (state, batch) -> (state, outputs): one jitted training step and what it reports
StepFn = Callable[[Any, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Every:
  """`run(step, state, outputs)` after every `every` steps, and after the last step."""
  every: int
  run: Callable[[int, Any, Any], None]


def is_due(step: int, every: int, total: int) -> bool:
  """Whether a periodic action runs after `step`: every `every` steps, and after the last."""
  return step % every == 0 or step == total


class Profiler:
  """A jax.profiler trace of the steps after `start` up to `stop` (config.train.profile_steps)
  in `logdir`, for TensorBoard's profile tab or Perfetto; each process writes its own."""

  def __init__(self, steps: tuple[int, ...], logdir: str):
    self.start, self.stop = tuple(steps) or (-1, -1)
    self.logdir, self.active = logdir, False

  def before(self, step: int) -> None:
    if self.start <= step < self.stop and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info('Profiling steps %d to %d into %s', step + 1, self.stop, self.logdir)

  def check_reachable(self, first_step: int, total_steps: int) -> None:
    """Says so when no step this run makes falls in the window (resumed past it, or too few)."""
    if self.stop > 0 and (self.stop <= first_step or self.start >= total_steps):
      logging.warning('config.train.profile_steps=(%d, %d): this run makes steps %d to %d, so '
                      'nothing is traced.', self.start, self.stop, first_step + 1, total_steps)

  def after(self, step: int, state: Any) -> None:
    if self.active and step >= self.stop:
      self.close(state)

  def close(self, state: Any) -> None:
    """Ends the trace; with `state`, after the traced steps' device work has finished."""
    if self.active:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False


def run_steps(step_fn: StepFn, state: Any, batches: Iterator, *, start: int, total: int,
              desc: str, hooks: tuple[Every, ...] = (), saves: Any = None,
              profiler: Profiler | None = None, exhausted: Callable[[], Exception] | None = None,
              loss_of: Callable[[Any], Any] | None = None, show_loss_every: int = 0
              ) -> tuple[Any, int]:
  """Runs steps `start`..`total` of `step_fn` on `batches`; returns the state and the step.

  - `saves` (a `checkpoints.SaveWatch`): checked after each step; the caller waits for the
    last saves (`saves.wait`) when its timing allows.
  - `exhausted()`: the error raised when `batches` ends before `total` (default: a RuntimeError).
  - `loss_of(outputs)`: shown in the bar every `show_loss_every` steps (a host sync there).
  The bar shows on the first process only. However the loop ends, the profiler's trace, the
  bar and `batches` (if it has `close`: tf.data readers end now, not at exit) are closed.
  """
  bar = tqdm(total=total, initial=start, desc=desc, unit='step', mininterval=5,
             disable=not partitioning.is_main_process())
  step = start
  try:
    while step < total:
      if profiler is not None:
        profiler.before(step)
      try:
        batch = next(batches)
      except StopIteration:
        raise (exhausted() if exhausted else
               RuntimeError(f'{desc}: the batches ended at step {step} of {total}.')) from None
      state, outputs = step_fn(state, batch)
      if saves is not None:
        saves.check(step)  # a failed save stops the run here, not an interval later
      step += 1
      if profiler is not None:
        profiler.after(step, state)
      bar.update(1)
      if loss_of is not None and show_loss_every and is_due(step, show_loss_every, total):
        bar.set_postfix(loss=f'{float(loss_of(outputs)):.4f}')
      for hook in hooks:
        if is_due(step, hook.every, total):
          hook.run(step, state, outputs)
    if profiler is not None:
      profiler.close(state)  # the traced steps' device work ends inside the trace
  finally:
    if profiler is not None:
      profiler.close(None)  # a trace begun is ended, even when a step fails
    bar.close()  # and an error is printed below the bar, not inside it
    close = getattr(batches, 'close', None)
    if close is not None:
      close()
  return state, step
