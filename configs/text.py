"""Byte-level language modelling on a local text file, given after a colon:

  python -m zoo.train --config=configs/text.py:/path/to/file.txt --workdir=DIR

Metrics include bits per byte (`bits_per_token`).
"""

from configs import default


def get_config(path: str = ""):
  config = default.get_config()
  config.num_train_steps = 2000
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.model.position = "sinusoidal"
  config.model.num_layers = 4
  config.model.embed_dim = 128
  config.model.mlp_dim = 512
  config.data.task = f"text(path={path!r})"
  config.data.seq_len = 256
  return config
