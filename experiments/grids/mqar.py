"""MQAR recall against decode-state size (the design of Zoology's Figure 2
and the Based paper's recall-state trade-off, Arora et al. 2023 and 2024,
scaled to CPU): test accuracy of every attention family at two widths,
one panel per (length, key-value pairs), against the floats of decode
state per layer each model holds.

  python -m experiments.sweep --grid=experiments/grids/mqar.py
  python -m experiments.sweep --grid=experiments/grids/mqar.py \
      --preset=quick --out=/tmp/mqar

The CPU preset is one panel, length 64 with 16 pairs (where 16 pairs in
a width-64 model separate the families), at width 64: 15 families x 3
learning rates x 3 seeds, 1000 steps of 32 sequences, in about 90 minutes
on 2 cores run as two tasks (`--num_tasks=2`). It is sized so that softmax
attention clears 0.99 on it (at lr 3e-3 by step 700 in the probe). The
wider design (lengths 64 and 128; 4, 8 and 16 pairs; widths 64 and
128) would be 1620 cells, about 20 hours on 2 cores at this preset's
per-cell cost; the `full` preset runs it, with a larger vocabulary and
longer training, on accelerators.

Every model is Zoology's: two layers, a short convolution layer (`conv`,
width 4) and then the family under test (`'conv;FAMILY'`), learned
positions, each family with its own defaults (DeltaNet and Mamba-2 keep
their short convolutions on q, k and v, as their papers do). Local
attention runs at several windows; sparse and BigBird at blocks of 8 and
4 (sane blocks: a query sees whole blocks, not single tokens); FAVOR+ at
64 and 256 features. The learning rate is swept per family and chosen on
the validation split; the table reports the test split. A run stops
early once its validation accuracy reaches 0.99 (steps to that are the
continuous metric). Baselines on every panel: chance (a value drawn
uniformly from the V/2 value tokens) and "some value of this sequence"
(1 / pairs, the plateau models sit on before they learn to look keys
up). A pattern op's ceiling is the share of test queries from which the
answer's value token is reachable at all through the stack's patterns
and convolutions.
"""

import functools

import numpy as np

from experiments import grids
from zoo import layers, registry
from zoo.data.mqar import mqar_example

FAMILIES = [
    "standard", "local(window=8)", "local(window=16)", "local(window=32)",
    "sparse(block=8)", "bigbird(block=4)", "linear(feature='elu')",
    "linear(feature='favor', num_features=64)",
    "linear(feature='favor', num_features=256)", "based", "retnet", "gla",
    "mamba2", "deltanet", "gated_deltanet"]

PRESETS = {
    # (seq_len, key-value pairs) panels, widths, learning rates, steps,
    # batch, vocabulary, (training, eval) examples, families.
    "quick": dict(panels=[(32, 4)], widths=[32], lrs=[3e-3], steps=30,
                  batch=16, vocab=64, examples=(1000, 256),
                  families=["standard", "local(window=8)", "gla"]),
    "cpu": dict(panels=[(64, 16)], widths=[64], lrs=[1e-3, 3e-3, 1e-2],
                steps=1000, batch=32, vocab=128, examples=(20000, 1000),
                families=FAMILIES),
    "full": dict(panels=[(64, 4), (64, 8), (64, 16), (128, 4), (128, 8),
                         (128, 16), (256, 16), (512, 64)],
                 widths=[64, 128, 256], lrs=[1e-4, 4.6e-4, 2.2e-3, 1e-2],
                 steps=20000, batch=256, vocab=8192,
                 examples=(100000, 3000), families=FAMILIES),
}
THRESHOLD = 0.99


def task(pairs: int, p: dict) -> str:
  return "mqar(num_pairs={}, vocab_size={}, num_train={}, num_eval={})".format(
      pairs, p["vocab"], *p["examples"])


def get_grid(preset: str) -> grids.Grid:
  p = PRESETS[preset]
  config = grids.recall_config(steps=p["steps"], batch=p["batch"],
                               threshold=THRESHOLD)
  config.model.position = "learned"

  def derive(c):
    c.model.mlp_dim = 4 * c.model.embed_dim
    c.model.attention = f"conv;{c.model.attention}"

  return grids.Grid(
      name="mqar", title="MQAR recall against decode-state size",
      description=__doc__.split("\n\n", 1)[0].replace("\n", " "),
      base=config,
      # Seeds outermost: a sweep cut short has every family at seed 0.
      axes=[{"seed": [0, 1, 2], "data.seq_len": [t],
             "data.task": [task(n, p)], "model.attention": p["families"],
             "model.embed_dim": p["widths"], "learning_rate": p["lrs"]}
            for t, n in p["panels"]],
      analysis=grids.Analysis(
          metric="eval_accuracy", line=("model.attention",),
          x="model.embed_dim", panels=("data.seq_len", "data.task"),
          best_over=("learning_rate",), success_threshold=THRESHOLD,
          reference_line="standard", x_value="state_floats_per_layer"),
      derive=derive, baselines=baselines, ceiling=ceiling)


def baselines(config) -> dict[str, float]:
  """Chance and the 'some value of this sequence' plateau."""
  _, args = registry.parse(config.data.task)
  return {"chance (uniform value)": 2 / args["vocab_size"],
          "a value of the sequence": 1 / args["num_pairs"]}


def ceiling(config) -> float | None:
  """The share of test-like queries whose answer's value token the stack
  can reach at all (None when every earlier token is reachable)."""
  _, args = registry.parse(config.data.task)
  return _ceiling(config.model.attention, config.model.num_layers,
                  config.model.num_heads, config.data.seq_len,
                  args["num_pairs"], args["vocab_size"])


@functools.lru_cache(maxsize=None)
def _ceiling(attention: str, num_layers: int, num_heads: int, t: int,
             pairs: int, vocab: int, examples: int = 512) -> float | None:
  reach_TxT = reachable(attention, num_layers, num_heads, t)
  if reach_TxT[np.tril_indices(t)].all():
    return None
  rng = np.random.default_rng(12345)
  hits = total = 0
  for _ in range(examples):
    ex = mqar_example(rng, t, pairs, vocab)
    inputs = ex["inputs"]
    for q in np.flatnonzero(ex["weights"]):
      key_at = int(np.flatnonzero(inputs[:q] == inputs[q])[0])
      hits += reach_TxT[q, key_at + 1]
      total += 1
  return hits / total


def reachable(attention: str, num_layers: int, num_heads: int,
              t: int) -> np.ndarray:
  """TxT bool: whether position j's token can influence the output at
  position i through the stack: each layer passes on what its op's
  pattern (any of `num_heads` heads) and its short convolutions (q, k and
  v, width W: W - 1 positions back) see, and the residual keeps what was
  there."""
  reach = np.eye(t, dtype=bool)
  for op in layers.layer_ops(attention, num_layers):
    width = getattr(op, "width", 0) if op.registry_name == "conv" else (
        getattr(op, "short_conv", 0))
    pattern = op.pattern_mask(t, causal=True, num_heads=num_heads).any(0)
    band = np.tri(t, dtype=bool) & ~np.tri(t, k=-max(width, 1), dtype=bool)
    step = (pattern.astype(int) @ band.astype(int) > 0) | band
    reach = (step.astype(int) @ reach.astype(int)) > 0
  return reach
