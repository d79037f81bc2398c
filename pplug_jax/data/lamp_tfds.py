"""LaMP and LongLaMP as tensorflow-datasets builders over manually downloaded files.

    import tensorflow_datasets as tfds
    from pplug_jax.data import lamp_tfds  # registers 'lamp'
    ds = tfds.load('lamp/LaMP_2_user', split='dev',
                   download_and_prepare_kwargs={'download_config':
                       tfds.download.DownloadConfig(manual_dir=LAMP_DIR)})

One config per task and split type (LaMP_1_user ... LaMP_7_time). The files are parsed and
validated by pplug_jax.data.lamp, so the query and profile-item text match the precompute path.

    from pplug_jax.data import lamp_tfds  # also registers 'long_lamp'
    ds = tfds.load('long_lamp/product_review_user', split='dev', ...)   # manual_dir=LONGLAMP_DIR

LongLaMP: one config per task and setting (abstract_generation_user ... email_completion_temporal),
read by pplug_jax.data.longlamp; the splits are train, dev (the release's val) and test.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from pplug_jax.data import lamp, longlamp
from pplug_jax.data.tasks import LONGLAMP_TASKS

_FEATURES = dict(
    id=tfds.features.Text(), input=tfds.features.Text(), query=tfds.features.Text(),
    output=tfds.features.Text(), has_output=tfds.features.Scalar(dtype=tf.bool),
    profile=tfds.features.Sequence({'id': tfds.features.Text(), 'text': tfds.features.Text(),
                                    'date': tfds.features.Text()}))


def _features(ex: lamp.Example) -> dict:
  """One example as the builders' features."""
  return {'id': ex.id, 'input': ex.input, 'query': ex.query, 'output': ex.output or '',
          'has_output': ex.output is not None,
          'profile': [{'id': i.id, 'text': i.text, 'date': i.date} for i in ex.profile]}


class LampConfig(tfds.core.BuilderConfig):
  def __init__(self, *, task: str, split_type: str, **kwargs):
    super().__init__(**kwargs)
    self.task = task
    self.split_type = split_type


class _ManualFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What both builders share: the features, and one split per split whose files are there."""

  VERSION = tfds.core.Version('1.0.0')
  BENCHMARK = ''

  def _root(self, manual_dir: str) -> str:
    raise NotImplementedError

  def _split_files(self, root: str, split: str) -> None:
    """Raises LampError where the split's files are not there."""
    raise NotImplementedError

  def _load(self, manual_dir: str, split: str) -> list[lamp.Example]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(_FEATURES),
                                          supervised_keys=None)

  def _split_generators(self, dl_manager):
    manual_dir = str(dl_manager.manual_dir)
    root = self._root(manual_dir)
    splits = {}
    for split in lamp.SPLITS:
      try:
        self._split_files(root, split)
      except lamp.LampError:
        continue
      splits[split] = self._generate_examples(manual_dir, split)
    if not splits:
      raise lamp.LampError(f'{root}: no {self.BENCHMARK} split files. '
                           f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return splits

  def _generate_examples(self, manual_dir: str, split: str):
    for ex in self._load(manual_dir, split):
      yield ex.id, _features(ex)


class Lamp(_ManualFiles):
  """The LaMP personalisation benchmark (questions, profiles and, where given, outputs)."""

  BENCHMARK = 'LaMP'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download the LaMP files and place them as <manual_dir>/LaMP_N/{split}_questions.json and '
      '{split}_outputs.json (user-based) or <manual_dir>/LaMP_time_N/... (time-based).')
  BUILDER_CONFIGS = [
      LampConfig(name=f'LaMP_{n}_{st}', task=f'LaMP_{n}', split_type=st,
                 description=f'LaMP-{n}, {st}-based split')
      for n in range(1, 8) for st in lamp.SPLIT_TYPES]

  def _root(self, manual_dir: str) -> str:
    return lamp.task_dir(manual_dir, self.builder_config.task, self.builder_config.split_type)

  def _split_files(self, root: str, split: str) -> None:
    lamp.split_files(root, split)

  def _load(self, manual_dir: str, split: str) -> list[lamp.Example]:
    c = self.builder_config
    return lamp.load_split(manual_dir, c.task, split, c.split_type)


class LongLamp(_ManualFiles):
  """LongLaMP's long-form tasks (inputs, profiles and outputs; test may lack outputs)."""

  BENCHMARK = 'LongLaMP'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download the subsets of the Hugging Face dataset LongLaMP/LongLaMP into '
      '<manual_dir>/<subset>/ (for example <manual_dir>/product_review_user/train-*.parquet), '
      'and the Avocado builder\'s email files into <manual_dir>/email_completion_user/.')
  BUILDER_CONFIGS = [
      LampConfig(name=f'{spec.folder}_{setting}', task=spec.name, split_type=setting,
                 description=f'{spec.name}, {setting} setting')
      for spec in LONGLAMP_TASKS.values() for setting in ('user', 'temporal')]

  def _root(self, manual_dir: str) -> str:
    return longlamp.task_dir(manual_dir, self.builder_config.task, self.builder_config.split_type)

  def _split_files(self, root: str, split: str) -> None:
    longlamp.split_files(root, split, LONGLAMP_TASKS[self.builder_config.task])

  def _load(self, manual_dir: str, split: str) -> list[lamp.Example]:
    c = self.builder_config
    return longlamp.load_split(manual_dir, c.task, split, c.split_type)
