"""Preparing a TFDS builder as array_record (no TensorFlow) and opening its
splits as random-access sources for grain."""

import numpy as np
import tensorflow_datasets as tfds

from zoo import supervise


def prepare_and_load(builder_cls, config, data_dir, splits: dict[str, str]):
  """Process 0 prepares the data (once per data_dir) while the others wait;
  every process then opens `splits` ({our name: TFDS split}) with
  `tfds.data_source`. A failed preparation raises on every process."""
  make = lambda: builder_cls(config=config, data_dir=data_dir,
                             file_format="array_record")

  def prepare():
    builder = make()
    try:
      builder.download_and_prepare()
    except FileExistsError:
      # Another program (a sweep's other task) finished preparing the same
      # data first: TFDS's final rename found its folder there.
      builder = make()
      if not builder.is_prepared():
        raise
    return builder

  builder = supervise.on_process_0(prepare, "prepare data")
  if builder is None:  # made after the wait: a builder reads the splits once
    builder = make()
  return {ours: builder.as_data_source(split=theirs)
          for ours, theirs in splits.items()}


def lm_features(seq_len: int) -> tfds.features.FeaturesDict:
  """inputs, targets (next tokens) and per-position loss weights."""
  return tfds.features.FeaturesDict({
      "inputs": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
      "targets": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
      "weights": tfds.features.Tensor(shape=(seq_len,), dtype=np.float32),
  })


class GeneratedBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder of synthetic examples: example i of a split is drawn from
  `np.random.default_rng((seed, split id, i))`, so preparation is
  deterministic. Splits (`SPLITS`, name -> id): train, test (the reported
  metric) and validation (curves, learning-rate choice), `num_eval` draws
  each but train; a subclass may add test splits of its own (e.g. longer
  sequences). A test split drops any example whose inputs occur in train,
  validation any in train or test. Subclasses define `_info` and
  `example(rng, split)`; their config has `num_train`, `num_eval` and
  `seed`."""

  SPLITS = {"train": 0, "test": 1, "validation": 2}

  def example(self, rng: np.random.Generator, split: str) -> dict:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _draw(self, split: str):
    c = self.builder_config
    count = c.num_train if split == "train" else c.num_eval
    for i in range(count):
      yield i, self.example(
          np.random.default_rng((c.seed, self.SPLITS[split], i)), split)

  def _generate_examples(self, split: str):
    before = {"train": (), "validation": ("train", "test")}.get(
        split, ("train",))
    seen = {ex["inputs"].tobytes() for other in before
            for _, ex in self._draw(other)}
    for key, example in self._draw(split):
      if example["inputs"].tobytes() not in seen:
        yield key, example
