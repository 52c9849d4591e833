"""MQAR recall against model width and sequence length (the design of
Zoology's Figure 2, Arora et al. 2023): eval accuracy of every attention
family at several widths, one panel per (length, key-value pairs), the best
learning rate kept per point.

  python -m experiments.sweep --grid=experiments/grids/mqar.py
  python -m experiments.sweep --grid=experiments/grids/mqar.py \
      --preset=quick --out=/tmp/mqar

Local, sparse and bigbird get window / block sizes whose keys per query
are closest to KEYS[preset] at every length (`grids.at_budget`), so the
panels run from "about the dense budget" (the shortest length) to a
fraction of it; dense and linear attention see every earlier key. The MLP
is 4x the width. Learning rate is an axis: each point reports the rate
with the best mean over seeds (Zoology keeps the best over its sweep too;
picking by the reported metric favours every variant alike).

Sizing (probes on this 2-core machine, standard attention, 2 layers, width
64, batch 32, vocab 64): MQAR learning is a sharp transition. 4 pairs at
length 64 with lr 3e-3 sat at 0.25 accuracy until step 300 and reached
0.88 at 400 and 1.0 by 600; 8 pairs (vocab 128) at length 128 stayed at
0.12-0.13 (the 1/8 of guessing among the sequence's values) through 1500
steps at lr 3e-3, as at 1e-3. So the CPU preset keeps 4 pairs and trains
past the transition.
"""

from configs import default
from experiments import grids

FAMILIES = ["standard", "local", "sparse", "bigbird",
            "linear(feature='elu')", "linear(feature='favor')"]

PRESETS = {
    # (seq_len, num_pairs) panels, widths, learning rates, steps, batch,
    # vocabulary, training examples, key budget.
    "quick": dict(panels=[(32, 4)], widths=[16, 32], lrs=[3e-3], steps=30,
                  batch=16, vocab=64, examples=1000, keys=16),
    "cpu": dict(panels=[(32, 4), (64, 4), (128, 4)], widths=[32, 64, 128],
                lrs=[3e-3], steps=600, batch=32, vocab=64, examples=20000,
                keys=16),
    "full": dict(panels=[(64, 4), (128, 8), (256, 16), (512, 64)],
                 widths=[64, 128, 256, 512], lrs=[1e-4, 4.6e-4, 2.2e-3, 1e-2],
                 steps=20000, batch=256, vocab=8192, examples=100000,
                 keys=32),
}


def get_grid(preset: str) -> grids.Grid:
  p = PRESETS[preset]
  config = default.get_config()
  config.num_train_steps = p["steps"]
  config.batch_size = p["batch"]
  config.warmup_steps = max(1, p["steps"] // 10)
  config.log_every_steps = max(1, p["steps"] // 10)
  config.eval_every_steps = max(1, p["steps"] // 5)
  config.checkpoint_every_steps = max(1, p["steps"] // 2)
  config.max_checkpoints_to_keep = 1

  def task(pairs):
    return (f"mqar(num_pairs={pairs}, vocab_size={p['vocab']}, "
            f"num_train={p['examples']}, num_eval=1000)")

  def derive(c):
    c.model.mlp_dim = 4 * c.model.embed_dim
    c.model.attention = grids.at_budget(c.model.attention, p["keys"],
                                        c.data.seq_len, causal=True)

  common = {"model.attention": FAMILIES, "model.embed_dim": p["widths"],
            "learning_rate": p["lrs"], "seed": [0, 1, 2]}
  return grids.Grid(
      name="mqar", title="MQAR accuracy against width and length",
      description=__doc__.split("\n\n", 1)[0].replace("\n", " "),
      base=config,
      axes=[{"data.seq_len": [t], "data.task": [task(n)], **common}
            for t, n in p["panels"]],
      analysis=grids.Analysis(
          metric="eval_accuracy", line=("model.attention",),
          x="model.embed_dim", panels=("data.seq_len", "data.task"),
          best_over=("learning_rate",)),
      derive=derive)
