"""Embedded default: MQAR with a 2-layer decoder, no network, a few minutes on
2 CPU cores
(eval accuracy near 1.0 by step 750; chance is 1/32).

  python -m zoo.train --config=configs/default.py --workdir=/tmp/zoo
"""

import ml_collections

from zoo import sharding


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_train_steps = 1000
  config.batch_size = 32  # global, over all processes
  config.learning_rate = 1e-3
  # Micro-batches per optimizer step (batch_size / k rows each, run one
  # after another in the compiled step): k times less activation memory,
  # the same update as the whole batch.
  config.grad_accum_steps = 1
  config.warmup_steps = 100
  config.lr_schedule = "cosine"  # after warmup: "cosine" or "constant"
  config.weight_decay = 0.1
  config.grad_clip_norm = 1.0
  # False: stop at a non-finite loss or gradient (exit 1, last checkpoint
  # kept); True: skip that update and count it in `skipped_updates`.
  config.skip_nonfinite = False
  config.log_every_steps = 50
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 500
  config.max_checkpoints_to_keep = 3
  # Peak dense TFLOP/s of one device; > 0 adds model FLOPs utilisation (mfu)
  # to the metrics.
  config.peak_tflops_per_device = 0.0
  # "" or "eval_METRIC>=X" / "eval_METRIC<=X": end the run at the first
  # evaluation that meets it (a checkpoint is saved; the test split, where
  # the task has one, is evaluated as at the last step).
  config.early_stop = ""
  # Seconds before a run that cannot go on exits 1: a peer process without
  # heartbeat, or SIGTERM whose checkpoint could not be saved in time.
  config.peer_timeout_s = 90

  config.model = ml_collections.ConfigDict()
  config.model.attention = "standard"
  config.model.position = "learned"
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.num_kv_heads = 4
  config.model.embed_dim = 64
  config.model.mlp_dim = 256
  config.model.dtype = "float32"
  config.model.param_dtype = "float32"
  # Rematerialisation in the backward pass: "none", "block" (each block's
  # activations recomputed from its input) or "matmuls" (a block keeps its
  # matmul outputs and recomputes the rest).
  config.model.remat = "none"

  config.data = ml_collections.ConfigDict()
  config.data.task = "mqar(num_pairs=4, vocab_size=64)"
  config.data.seq_len = 64
  config.data.dir = ""  # TFDS data_dir; "" = TFDS's default

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  # Activations' sequence axis sharded over this many devices (context
  # parallelism); data.seq_len must be divisible by it.
  config.mesh.sequence = 1
  config.mesh.tensor = 1
  # Logical axis -> mesh axes; unnamed logical axes are replicated.
  config.mesh.rules = sharding.DEFAULT_RULES
  return config
