"""A TFDS dataset by name, through TFDS's mock data (no network here)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from zoo import metrics, registry, train


def test_mock_lm1b_gives_byte_windows():
  task = registry.build("task", "tfds_text(name='lm1b')", seq_len=32)
  with tfds.testing.mock_data(num_examples=8,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    sources = task.sources(None)
    ex = sources["train"][0]
  assert len(sources["train"]) == 8
  assert ex["inputs"].shape == (32,) and ex["inputs"].max() < 256
  n = int(ex["weights"].sum())
  np.testing.assert_array_equal(ex["inputs"][1:n], ex["targets"][:n - 1])


@pytest.mark.slow  # the fast tier trains in tests/test_toy_family.py
def test_trainer_runs_on_a_tfds_dataset_by_name(tiny_config, tmp_path):
  tiny_config.data.task = "tfds_text(name='lm1b')"
  tiny_config.num_train_steps = 5
  tiny_config.eval_every_steps = 5
  with tfds.testing.mock_data(num_examples=32,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    last = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert np.isfinite(last["eval_loss"])
  assert metrics.read(str(tmp_path))[-1]["step"] == 5


def test_absent_dataset_is_a_clear_error(tmp_path):
  task = registry.build("task", "tfds_text(name='lm1b')", seq_len=16)
  with pytest.raises(ValueError, match="cannot open split 'train'"):
    task.sources(str(tmp_path))
