"""LaMP as a tensorflow-datasets builder over manually downloaded files.

    import tensorflow_datasets as tfds
    from pplug_jax.data import lamp_tfds  # registers 'lamp'
    ds = tfds.load('lamp/LaMP_2_user', split='dev',
                   download_and_prepare_kwargs={'download_config':
                       tfds.download.DownloadConfig(manual_dir=LAMP_DIR)})

One config per task and split type (LaMP_1_user ... LaMP_7_time). The files are parsed and
validated by pplug_jax.data.lamp, so the query and profile-item text match the precompute path.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from pplug_jax.data import lamp


class LampConfig(tfds.core.BuilderConfig):
  def __init__(self, *, task: str, split_type: str, **kwargs):
    super().__init__(**kwargs)
    self.task = task
    self.split_type = split_type


class Lamp(tfds.core.GeneratorBasedBuilder):
  """The LaMP personalisation benchmark (questions, profiles and, where given, outputs)."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download the LaMP files and place them as <manual_dir>/LaMP_N/{split}_questions.json and '
      '{split}_outputs.json (user-based) or <manual_dir>/LaMP_time_N/... (time-based).')
  BUILDER_CONFIGS = [
      LampConfig(name=f'LaMP_{n}_{st}', task=f'LaMP_{n}', split_type=st,
                 description=f'LaMP-{n}, {st}-based split')
      for n in range(1, 8) for st in lamp.SPLIT_TYPES]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'id': tfds.features.Text(),
        'input': tfds.features.Text(),
        'query': tfds.features.Text(),
        'output': tfds.features.Text(),
        'has_output': tfds.features.Scalar(dtype=tf.bool),
        'profile': tfds.features.Sequence({
            'id': tfds.features.Text(), 'text': tfds.features.Text(),
            'date': tfds.features.Text()}),
    }), supervised_keys=None)

  def _split_generators(self, dl_manager):
    root = lamp.task_dir(str(dl_manager.manual_dir), self.builder_config.task,
                         self.builder_config.split_type)
    splits = {}
    for split in lamp.SPLITS:
      try:
        lamp.split_files(root, split)
      except lamp.LampError:
        continue
      splits[split] = self._generate_examples(str(dl_manager.manual_dir), split)
    if not splits:
      raise lamp.LampError(f'{root}: no LaMP split files. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return splits

  def _generate_examples(self, lamp_dir: str, split: str):
    c = self.builder_config
    for ex in lamp.load_split(lamp_dir, c.task, split, c.split_type):
      yield ex.id, {
          'id': ex.id, 'input': ex.input, 'query': ex.query, 'output': ex.output or '',
          'has_output': ex.output is not None,
          'profile': [{'id': i.id, 'text': i.text, 'date': i.date} for i in ex.profile]}
