"""Shared fixtures: a session-wide TFDS data dir and tiny training configs.
The session compiles as the trainer does (zoo/xla_flags.py), and so do the
subprocesses it starts, which inherit XLA_FLAGS: a run killed in one process
and resumed in another is compared bit for bit."""

import os

import pytest

from configs import default
from zoo import xla_flags

xla_flags.apply()  # before any test starts jax's backend


def xla_flags_with_devices(n: int) -> str:
  """This session's XLA_FLAGS plus n fake CPU devices, for a subprocess."""
  return " ".join([os.environ.get("XLA_FLAGS", ""),
                   f"--xla_force_host_platform_device_count={n}"]).strip()


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
