"""Preparing a TFDS builder as array_record (no TensorFlow) and opening its
splits as random-access sources for grain."""

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils


def prepare_and_load(builder_cls, config, data_dir, splits: dict[str, str]):
  """Process 0 prepares the data (once per data_dir); every process then
  opens `splits` ({our name: TFDS split}) with `tfds.data_source`."""
  builder = builder_cls(config=config, data_dir=data_dir,
                        file_format="array_record")
  if jax.process_index() == 0:
    builder.download_and_prepare()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("zoo data prepared")
  return {ours: builder.as_data_source(split=theirs)
          for ours, theirs in splits.items()}
