"""Synthetic personalised data in exactly the LaMP file format.

Each user has a latent preference (a genre for LaMP-2, a tweet style for LaMP-7) that decides
every output of theirs. The preference shows in the *text* of their profile items, while the
input is drawn independently of it. So by construction no predictor that sees only the input
can beat the frequency of the most common preference: with K preferences drawn uniformly the
best non-personalised accuracy is 1/K (exactly: the majority-label share of the split, which
`synthetic_info.json` records).

With `lengths='lamp'` the texts take LaMP's lengths instead of the short defaults: the input,
output and profile-item word counts are drawn per task from normal distributions with the
means and spreads of the LaMP paper's data-statistics table (`LAMP_LENGTHS`), so throughput
measured on them reflects the real padding. The personalisation signal is unchanged.

    python -m pplug_jax.data.synthetic --out DIR --task LaMP_2 --train_users 200 --seed 0
"""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np
from absl import app, flags

from pplug_jax import fileio
from pplug_jax.data import lamp

GENRE_WORDS = {
    'sci-fi': 'space robot alien planet laser starship galaxy android cyborg orbit',
    'comedy': 'joke laugh prank silly clown hilarious goofy sitcom gag wacky',
    'romance': 'love kiss wedding heart date passion couple romantic valentine flirt',
    'action': 'chase explosion fight gun car heist punch battle mission spy',
    'fantasy': 'dragon wizard magic elf castle spell quest sword kingdom witch',
    'dystopia': 'regime surveillance rebellion ruins totalitarian ration curfew propaganda '
                'wasteland uprising',
    'true story': 'biography historical real documentary memoir veteran archive events '
                  'testimony chronicle',
    'psychology': 'mind therapy trauma memory dream obsession identity anxiety paranoia psyche',
}
TWEET_STYLES = ('lol', 'honestly', 'wow', 'ugh', 'yay', 'hmm', 'omg', 'sigh')
FILLER = ('people city family friends journey night life house town story years day world '
          'secret young old man woman finds meets learns returns after before during small '
          'big new last first home road school work river winter summer letter').split()

# Word counts (mean, standard deviation) of LaMP's user split, from the LaMP paper: Salemi et
# al., "LaMP: When Large Language Models Meet Personalization" (ACL 2024, arXiv:2304.11406),
# Table 2 (average input and output length in words). Profile-item lengths are not in that
# table; those here are estimates from the tasks' item fields (a movie description, a news
# article's text, a tweet). Outputs of LaMP-2 are one of the 15 tags.
LAMP_LENGTHS = {
    'LaMP_2': {'input': (92.4, 21.9), 'output': None, 'item': (60.0, 20.0)},
    'LaMP_4': {'input': (30.0, 12.1), 'output': (10.1, 3.1), 'item': (40.0, 15.0)},
    'LaMP_7': {'input': (29.7, 7.0), 'output': (17.0, 5.7), 'item': (17.0, 6.0)},
}
LAMP2_PROMPT_WORDS = 26  # the fixed LaMP-2 question around the description, in words

LAMP2_PROMPT = ('Which tag does this movie relate to among the following tags? Just answer with '
                'the tag name without further explanation. tags: [{tags}] description: {text}')
LAMP7_PROMPT = 'Paraphrase the following tweet without any explanation before or after it: {text}'
LAMP4_PROMPT = 'Generate a headline for the following article: {text}'

SUPPORTED = ('LaMP_2', 'LaMP_4', 'LaMP_7')
LENGTHS = ('short', 'lamp')
# 'stable': one preference per user (the default; its files are unchanged byte for byte).
# 'drift': each user's preference changes at a random date; only the items after it show the
# current one, which decides the output. 'two_preferences': a user has one preference per kind
# of input (KIND_WORDS), and the input's kind decides which one answers. LaMP-2 only.
SCENARIOS = ('stable', 'drift', 'two_preferences')
KIND_WORDS = ('sunrise', 'midnight')
DRIFT_CHANGE = (0.6, 0.9)  # where in a user's dated history the preference changes (share)


def _count(rng: np.random.Generator, stats: tuple[float, float] | None, default: int,
           minimum: int = 2) -> int:
  """A word count: the default, or one drawn from N(mean, sd) and kept >= minimum."""
  if stats is None:
    return default
  return max(minimum, int(round(rng.normal(*stats))))


def _words(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
  return [pool[i] for i in rng.integers(0, len(pool), n)]


def _profile_size(rng: np.random.Generator, empty_frac: float, long_frac: float,
                  mean_items: int) -> int:
  u = rng.random()
  if u < empty_frac:
    return 0
  if u < empty_frac + long_frac:
    return int(rng.integers(520, 700))  # more than the 512 most recent items kept
  return int(np.clip(rng.poisson(mean_items), 1, 4 * mean_items))


def _dates(rng: np.random.Generator, n: int) -> list[str]:
  days = np.sort(rng.integers(0, 3650, n))
  base = np.datetime64('2010-01-01')
  return [str(base + np.timedelta64(int(d), 'D')) for d in days]


def make_user(task: str, uid: str, pref: int, prefs: Sequence[str], n_items: int,
              rng: np.random.Generator, signal: float, lengths: str = 'short',
              scenario: str = 'stable', other: int = -1) -> tuple[dict, str]:
  """One LaMP question (with profile) and its output for a user with preference `pref` (and,
  outside 'stable', a second preference `other`: the one before the drift, or the one of the
  second kind of input)."""
  stats = LAMP_LENGTHS[task] if lengths == 'lamp' else {'input': None, 'output': None,
                                                         'item': None}
  dates = _dates(rng, n_items)
  change = int(np.ceil(n_items * rng.uniform(*DRIFT_CHANGE))) if scenario == 'drift' else 0
  profile = []
  for k in range(n_items):
    current, kind = pref, None
    if scenario == 'drift' and k < change:
      current = other
    elif scenario == 'two_preferences':
      kind = int(rng.integers(0, 2))
      current = pref if kind == 0 else other
    own = rng.random() < signal
    p = current if own else int(rng.integers(0, len(prefs)))
    if task == 'LaMP_2':
      words = _words(rng, GENRE_WORDS[prefs[p]].split(), 3) + _words(
          rng, FILLER, _count(rng, stats['item'], 8, minimum=4) - 3)
      if kind is not None:
        words.append(KIND_WORDS[kind])
      rng.shuffle(words)
      profile.append({'id': f'{uid}{k:04d}', 'tag': prefs[p], 'description': ' '.join(words),
                      'date': dates[k]})
    elif task == 'LaMP_4':
      profile.append({'id': f'{uid}{k:04d}', 'title': f'{prefs[p]} ' + ' '.join(
          _words(rng, FILLER, 5)), 'text': ' '.join(_words(rng, FILLER, _count(
              rng, stats['item'], 8))), 'date': dates[k]})
    else:
      text = f'{prefs[p]}: ' + ' '.join(_words(rng, FILLER, _count(rng, stats['item'], 7) - 1))
      profile.append({'id': f'{uid}{k:04d}', 'text': text, 'date': dates[k]})
  if task == 'LaMP_2':
    n = _count(rng, stats['input'] and (stats['input'][0] - LAMP2_PROMPT_WORDS,
                                        stats['input'][1]), 8)
    words = _words(rng, FILLER, n)
    answer = pref
    if scenario == 'two_preferences':
      kind = int(rng.integers(0, 2))
      words.insert(int(rng.integers(0, len(words) + 1)), KIND_WORDS[kind])
      answer = pref if kind == 0 else other
    body = ' '.join(words)
    question = LAMP2_PROMPT.format(tags=', '.join(prefs), text=body)
    output = prefs[answer]
  elif task == 'LaMP_4':
    body = ' '.join(_words(rng, FILLER, _count(rng, stats['input'] and (
        stats['input'][0] - 7, stats['input'][1]), 8)))
    question = LAMP4_PROMPT.format(text=body)
    output = f'{prefs[pref]} ' + ' '.join(body.split()[:_count(rng, stats['output'], 6) - 1])
  else:
    body = ' '.join(_words(rng, FILLER, _count(rng, stats['input'] and (
        stats['input'][0] - 11, stats['input'][1]), 8)))
    question = LAMP7_PROMPT.format(text=body)
    kept = body.split()[:_count(rng, stats['output'], len(body.split())) - 1] \
        if lengths == 'lamp' else body.split()
    output = f'{prefs[pref]}: ' + ' '.join(kept)
  return {'id': uid, 'input': question, 'profile': profile}, output


def generate(out_dir: str, task: str = 'LaMP_2', split_type: str = 'user',
             users: dict[str, int] | None = None, num_preferences: int = 4, seed: int = 0,
             empty_frac: float = 0.05, long_frac: float = 0.02, mean_items: int = 20,
             signal: float = 0.8, lengths: str = 'short', scenario: str = 'stable') -> dict:
  """Writes train/dev/test files under `lamp.task_dir(out_dir, task, split_type)`; returns info."""
  task = lamp.task_spec(task).name
  if task not in SUPPORTED:
    raise ValueError(f'synthetic data exists for {SUPPORTED}, not {task}.')
  if lengths not in LENGTHS:
    raise ValueError(f'lengths={lengths!r}: use one of {LENGTHS}.')
  if scenario not in SCENARIOS:
    raise ValueError(f'scenario={scenario!r}: use one of {SCENARIOS}.')
  if scenario != 'stable' and task != 'LaMP_2':
    raise ValueError(f'scenario={scenario!r} exists for LaMP_2 only, not {task}.')
  pool = list(GENRE_WORDS) if task == 'LaMP_2' else list(TWEET_STYLES)
  if not 2 <= num_preferences <= len(pool):
    raise ValueError(f'num_preferences must be in [2, {len(pool)}] for {task}.')
  prefs = pool[:num_preferences]
  users = users or {'train': 200, 'dev': 50, 'test': 50}
  rng = np.random.default_rng(seed)
  root = lamp.task_dir(out_dir, task, split_type)
  info = {'task': task, 'seed': seed, 'preferences': prefs, 'lengths': lengths,
          **({'scenario': scenario} if scenario != 'stable' else {}),
          'best_non_personalised_accuracy': 1.0 / num_preferences, 'splits': {}}
  next_uid = 100000
  for split, n in users.items():
    questions, outputs, counts = [], {}, collections.Counter()
    for _ in range(n):
      uid = str(next_uid)
      next_uid += 1
      pref = int(rng.integers(0, num_preferences))
      other = -1
      if scenario != 'stable':  # a second preference, never the first (no draw when stable)
        other = (pref + 1 + int(rng.integers(0, num_preferences - 1))) % num_preferences
      size = _profile_size(rng, empty_frac, long_frac, mean_items)
      q, o = make_user(task, uid, pref, prefs, size, rng, signal, lengths, scenario, other)
      questions.append(q)
      outputs[uid] = o
      counts[o if scenario != 'stable' else prefs[pref]] += 1  # o: the LaMP-2 tag
    lamp.write_split(root, split, task, questions, None if split == 'test' else outputs)
    if split == 'test':  # keep the hidden answers next to, not inside, the LaMP files
      fileio.write_json(os.path.join(root, 'test_hidden_outputs.json'),
                        lamp.golds_file(task, list(outputs), list(outputs.values())), None)
    sizes = [len(q['profile']) for q in questions]
    info['splits'][split] = {
        'users': n, 'empty_profiles': sum(s == 0 for s in sizes),
        'profiles_over_512': sum(s > 512 for s in sizes), 'profile_items': int(sum(sizes)),
        'majority_share': max(counts.values()) / n if n else 0.0}
  fileio.write_json(os.path.join(root, 'synthetic_info.json'), info)
  return info


FLAGS = flags.FLAGS


def main(argv):
  del argv
  info = generate(FLAGS.out, FLAGS.task, FLAGS.split_type,
                  {'train': FLAGS.train_users, 'dev': FLAGS.dev_users, 'test': FLAGS.test_users},
                  FLAGS.num_preferences, FLAGS.seed, FLAGS.empty_frac, FLAGS.long_frac,
                  FLAGS.mean_items, FLAGS.signal, FLAGS.lengths, FLAGS.scenario)
  print(json.dumps(info, indent=1))


if __name__ == '__main__':
  flags.DEFINE_string('out', None, 'Output root (LaMP_N/ or LaMP_time_N/ is created in it).')
  flags.DEFINE_string('task', 'LaMP_2', f'One of {SUPPORTED}.')
  flags.DEFINE_enum('split_type', 'user', list(lamp.SPLIT_TYPES), 'Folder layout to write.')
  flags.DEFINE_integer('train_users', 200, 'Users (= questions) in train.')
  flags.DEFINE_integer('dev_users', 50, 'Users in dev.')
  flags.DEFINE_integer('test_users', 50, 'Users in test.')
  flags.DEFINE_integer('num_preferences', 4, 'Distinct latent preferences K (best '
                       'non-personalised accuracy = 1/K).')
  flags.DEFINE_integer('seed', 0, 'Seed; same seed, same files.')
  flags.DEFINE_float('empty_frac', 0.05, 'Share of users with an empty profile.')
  flags.DEFINE_float('long_frac', 0.02, 'Share of users with more than 512 profile items.')
  flags.DEFINE_integer('mean_items', 20, 'Mean profile size of the other users.')
  flags.DEFINE_float('signal', 0.8, "Share of a user's items that show their preference.")
  flags.DEFINE_enum('lengths', 'short', list(LENGTHS), "'lamp': LaMP's text lengths per task.")
  flags.DEFINE_enum('scenario', 'stable', list(SCENARIOS), "'drift' or 'two_preferences' "
                    '(LaMP-2): data where the time-aware and several-token variants should matter.')
  flags.mark_flag_as_required('out')
  app.run(main)
