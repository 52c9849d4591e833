"""MQAR recall against model width and sequence length (the design of
Zoology's Figure 2, Arora et al. 2023): eval accuracy of every attention
family at several widths, one panel per (length, key-value pairs), the best
learning rate kept per point.

  python -m experiments.sweep --grid=experiments/grids/mqar.py
  python -m experiments.sweep --grid=experiments/grids/mqar.py \
      --preset=quick --out=/tmp/mqar

Local, sparse and bigbird get the largest window / block with which a query
sees at most the preset's `keys` (`grids.at_budget`) at every length, so the
longer panels give them a smaller share of the dense budget; dense and
linear attention see every earlier key. The MLP is 4x the width. Learning
rate is an axis: each point reports the rate with the best mean over seeds
(as Zoology keeps the best of its learning-rate sweep; the pick is made on
the reported metric, alike for every variant). The CPU preset has one rate,
the one probes found best.

MQAR is learned in a sharp transition, from chance (guessing among the
sequence's values) to near 1.0, at a step that grows with length and with
the number of pairs. The CPU preset therefore keeps 4 pairs at lengths
16-64 with 300-700 steps, where standard attention clears the transition
in CPU time; more pairs or length 128 would not. The probes and the sizing
figures behind these choices are in experiments/results/mqar/RESULTS.md,
"Notes from earlier runs".
"""

from configs import default
from experiments import grids

PRESETS = {
    # (seq_len, key-value pairs, steps) panels, widths, learning rates,
    # batch, vocabulary, (training, eval) examples, key budget.
    "quick": dict(panels=[(16, 4, 20)], widths=[16, 32], lrs=[3e-3],
                  batch=16, vocab=64, examples=(1000, 256), keys=8),
    "cpu": dict(panels=[(16, 4, 300), (32, 4, 400), (64, 4, 700)],
                widths=[16, 32, 64], lrs=[3e-3], batch=32, vocab=64,
                examples=(20000, 1000), keys=8),
    "full": dict(panels=[(64, 4, 20000), (128, 8, 20000), (256, 16, 20000),
                         (512, 64, 20000)],
                 widths=[64, 128, 256, 512], lrs=[1e-4, 4.6e-4, 2.2e-3, 1e-2],
                 batch=256, vocab=8192, examples=(100000, 3000), keys=32),
}


def get_grid(preset: str) -> grids.Grid:
  p = PRESETS[preset]
  config = default.get_config()
  config.batch_size = p["batch"]
  config.max_checkpoints_to_keep = 1

  def task(pairs):
    sizes = ("" if p["examples"] == (20000, 1000) else
             ", num_train={}, num_eval={}".format(*p["examples"]))
    return f"mqar(num_pairs={pairs}, vocab_size={p['vocab']}{sizes})"

  def derive(c):
    steps = c.num_train_steps
    c.warmup_steps = max(1, steps // 10)
    c.log_every_steps = max(1, steps // 10)
    c.eval_every_steps = steps
    c.checkpoint_every_steps = max(1, steps // 2)
    c.model.mlp_dim = 4 * c.model.embed_dim
    c.model.attention = grids.at_budget(c.model.attention, p["keys"],
                                        c.data.seq_len, causal=True)

  common = {"model.attention": grids.FAMILIES, "model.embed_dim": p["widths"],
            "learning_rate": p["lrs"], "seed": [0, 1, 2]}
  return grids.Grid(
      name="mqar", title="MQAR accuracy against width and length",
      description=__doc__.split("\n\n", 1)[0].replace("\n", " "),
      base=config,
      axes=[{"data.seq_len": [t], "data.task": [task(n)],
             "num_train_steps": [steps], **common}
            for t, n, steps in p["panels"]],
      analysis=grids.Analysis(
          metric="eval_accuracy", line=("model.attention",),
          x="model.embed_dim",
          panels=("data.seq_len", "data.task", "num_train_steps"),
          best_over=("learning_rate",)),
      derive=derive)
