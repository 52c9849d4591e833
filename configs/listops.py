"""ListOps classification with the encoder (CPU size: 256 tokens; LRA uses
2048 — override data.seq_len and the model on accelerators).

  python -m zoo.train --config=configs/listops.py --workdir=/tmp/listops
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_train_steps = 3000
  config.learning_rate = 1e-3
  config.warmup_steps = 200
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 1000
  config.model.position = "sinusoidal"
  config.model.num_layers = 4
  config.model.embed_dim = 128
  config.model.mlp_dim = 512
  config.data.task = "listops(num_train=20000, num_eval=1000)"
  config.data.seq_len = 256
  return config
