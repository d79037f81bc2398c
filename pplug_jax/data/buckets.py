"""Length buckets: a few static (input, target) batch shapes instead of padding to the maxima.

LaMP's inputs and outputs are far shorter than `data.max_input_length` (256) and
`data.max_target_length` (128): padding every batch to the maxima, as the reference's collator
does, spends most of a LaMP-4 or LaMP-7 step on padding. Here every example goes to the
smallest of a fixed set of shapes that holds it (by padded area, then input length).

The rule (`data.bucketing='auto'`): input bounds at the 50th and 90th percentiles of the
split's input lengths, rounded up to a multiple of 16, plus `max_input_length`; target bounds
at the 90th percentile, rounded up to a multiple of 8, plus `max_target_length`; every pair of
an input and a target bound is a shape. `data.input_buckets` / `data.target_buckets` give the
bounds by hand (the maxima are always added); `data.bucketing='off'` is the single padded
shape. Lengths beyond the maxima are truncated as before, so the maximum shape holds anything.

For training, a shape that some data stream has no example of is merged into the next larger
shape that holds its examples, so every stream can serve every step: all streams and processes
follow one schedule of shapes (`schedule`), drawn per step from the config seed with
probabilities proportional to the shapes' shares of the (augmented) train split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

INPUT_QUANTILES, INPUT_MULTIPLE = (0.5, 0.9), 16
TARGET_QUANTILES, TARGET_MULTIPLE = (0.9,), 8
MODES = ('auto', 'off')
_SCHEDULE_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Static (input length, target length) shapes, ordered by padded area then input length."""
  shapes: tuple[tuple[int, int], ...]

  def __post_init__(self):
    object.__setattr__(self, 'shapes', tuple(sorted(set(self.shapes),
                                                    key=lambda s: (s[0] * s[1], s))))

  def assign(self, input_lengths: np.ndarray, target_lengths: np.ndarray) -> np.ndarray:
    """The index of the smallest shape holding each example (-1 if none does)."""
    li, lt = np.asarray(input_lengths)[:, None], np.asarray(target_lengths)[:, None]
    fits = (li <= np.array([s[0] for s in self.shapes])[None]) & \
        (lt <= np.array([s[1] for s in self.shapes])[None])
    return np.where(fits.any(1), fits.argmax(1), -1)

  def table(self, max_input: int, max_target: int) -> np.ndarray:
    """[max_input + 1, max_target + 1] shape index of every (clipped) length pair."""
    li, lt = np.meshgrid(np.arange(max_input + 1), np.arange(max_target + 1), indexing='ij')
    return self.assign(li.ravel(), lt.ravel()).reshape(li.shape).astype(np.int32)


def pad_size(n: int, cap: int, minimum: int = 8) -> int:
  """The padded size of a dynamic dimension (a text's tokens, a batch's rows, a history): the
  next power of two >= max(n, minimum), at most `cap`. Few distinct sizes, few compiles."""
  size = minimum
  while size < n:
    size *= 2
  return max(1, min(size, cap))


def _bounds(lengths: np.ndarray, maximum: int, quantiles: Sequence[float], multiple: int,
            given: Sequence[int]) -> list[int]:
  if given:
    picked = [int(b) for b in given]
  elif len(lengths):
    picked = [int(math.ceil(np.quantile(lengths, q, method='higher') / multiple) * multiple)
              for q in quantiles]
  else:
    picked = []
  return sorted({min(max(b, 1), maximum) for b in picked} | {maximum})


def candidates(config, lengths: np.ndarray) -> Buckets:
  """All shapes of the rule (module doc) for [n, >= 2] (input, target) lengths, clipped."""
  d = config.data
  if d.bucketing == 'off':
    return Buckets(((d.max_input_length, d.max_target_length),))
  li, lt = clip(config, lengths) if len(lengths) else (lengths, lengths)
  inputs = _bounds(li, d.max_input_length, INPUT_QUANTILES, INPUT_MULTIPLE, d.input_buckets)
  targets = _bounds(lt, d.max_target_length, TARGET_QUANTILES, TARGET_MULTIPLE,
                    d.target_buckets)
  return Buckets(tuple((i, t) for i in inputs for t in targets))


def clip(config, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return (np.minimum(lengths[:, 0], config.data.max_input_length),
          np.minimum(lengths[:, 1], config.data.max_target_length))


def for_training(config, stream_lengths: Sequence[np.ndarray],
                 copies: int) -> tuple[Buckets, np.ndarray]:
  """(buckets every stream has examples of, each bucket's share of the augmented split).

  `stream_lengths[s]` is [n_s, 3] (input, target, history) lengths of stream s's examples;
  a history of more than 2 items counts 1 + `copies` times (the augmentation's copies).
  """
  everything = np.concatenate(stream_lengths) if stream_lengths else np.zeros((0, 3), int)
  buckets = candidates(config, everything)
  while True:
    per_stream = []
    for lengths in stream_lengths:
      idx = buckets.assign(*clip(config, lengths))
      weight = 1 + copies * (lengths[:, 2] > 2) if copies > 0 else np.ones(len(lengths), int)
      per_stream.append(np.bincount(idx, weights=weight, minlength=len(buckets.shapes)))
    counts = np.stack(per_stream)
    last = len(buckets.shapes) - 1  # the maxima: holds every example, never merged away
    if (counts[:, last] == 0).any() and counts[:, last].sum() > 0:
      # some stream has no example of the largest shape that others need: one shape for all
      return Buckets((buckets.shapes[last],)), np.ones(1)
    missing = [s for j, s in enumerate(buckets.shapes) if (counts[:, j] == 0).any() and j != last]
    if not missing:
      break
    buckets = Buckets(tuple(s for s in buckets.shapes if s not in missing))
  total = counts.sum(0)
  keep = [j for j in range(len(buckets.shapes)) if total[j] > 0] or [len(buckets.shapes) - 1]
  buckets = Buckets(tuple(buckets.shapes[j] for j in keep))
  weights = total[keep] / max(total[keep].sum(), 1)
  return buckets, (weights if weights.sum() > 0 else np.ones(len(keep)) / len(keep))


def schedule(seed: int, weights: np.ndarray, start: int, count: int) -> np.ndarray:
  """The bucket of each global step in [start, start + count): the same on every process."""
  if len(weights) == 1:
    return np.zeros(count, np.int64)
  out = []
  first, last = start // _SCHEDULE_BLOCK, (start + count - 1) // _SCHEDULE_BLOCK
  for block in range(first, last + 1):
    rng = np.random.default_rng([seed, 0xB0C4E7, block])
    out.append(rng.choice(len(weights), size=_SCHEDULE_BLOCK, p=weights))
  flat = np.concatenate(out)
  offset = start - first * _SCHEDULE_BLOCK
  return flat[offset:offset + count]
