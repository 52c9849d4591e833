"""Shared fixtures: a session-wide TFDS data dir and tiny training configs."""

import pytest

from configs import default


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_config(data_dir):
  return make_tiny_config(data_dir)


def make_tiny_config(data_dir):
  """The default config shrunk to seconds on 2 CPU cores."""
  config = default.get_config()
  config.num_train_steps = 20
  config.batch_size = 8
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 5
  config.warmup_steps = 2
  config.model.num_layers = 1
  config.model.embed_dim = 32
  config.model.mlp_dim = 64
  config.data.seq_len = 32
  config.data.task = "mqar(num_pairs=4, vocab_size=32, num_train=512, num_eval=64)"
  config.data.dir = data_dir
  config.mesh.data = 1
  return config
