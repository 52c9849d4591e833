"""Copying with length generalisation (Jelassi et al. 2024, "Repeat After
Me"): per-symbol accuracy of the copy for strings of the training lengths
(1x) and of 1.5x and 2x the longest training string, per attention
family.

  python -m experiments.sweep --grid=experiments/grids/copying.py
  python -m experiments.sweep --grid=experiments/grids/copying.py \
      --preset=quick --out=/tmp/copying

Models are the MQAR grid's: a short convolution layer, then the family
under test (`'conv;FAMILY'`), each family with rotary positions where it
takes them and none otherwise (the recurrences carry order in their
state). The learning rate is swept per family and chosen on the
validation split (training lengths); a run stops early at 0.99 there.
What to expect, from the paper: softmax attention copies in distribution
and, with relative positions, somewhat beyond; a fixed-state model fails
once a string's information, length x log2(symbols) bits, outgrows its
state (the tables give the state beside it); a window fails past its
width.
"""

import math
import os

from experiments import grids, report
from zoo import registry

FAMILIES = ["standard", "local(window=16)", "linear(feature='elu')", "based",
            "retnet", "gla", "mamba2", "deltanet", "gated_deltanet"]
SPLITS = {"test": 1.0, "test_x15": 1.5, "test_x2": 2.0}
THRESHOLD = 0.99

PRESETS = {
    # Longest training string, symbols + 2, width, learning rates, steps,
    # batch, (training, eval) examples, families.
    "quick": dict(max_len=4, vocab=20, width=32, lrs=[3e-3], steps=30,
                  batch=16, examples=(1000, 128),
                  families=["standard", "gla"]),
    "cpu": dict(max_len=16, vocab=32, width=64, lrs=[1e-3, 3e-3, 1e-2],
                steps=1000, batch=32, examples=(20000, 500),
                families=FAMILIES),
    "full": dict(max_len=256, vocab=32, width=256,
                 lrs=[1e-4, 4.6e-4, 2.2e-3, 1e-2], steps=20000, batch=64,
                 examples=(100000, 2000), families=FAMILIES),
}


def get_grid(preset: str) -> grids.Grid:
  p = PRESETS[preset]
  config = grids.recall_config(steps=p["steps"], batch=p["batch"],
                               threshold=THRESHOLD)
  config.model.embed_dim, config.model.mlp_dim = p["width"], 4 * p["width"]
  config.data.seq_len = 4 * p["max_len"]
  config.data.task = (
      "copy(max_len={}, vocab_size={}, num_train={}, num_eval={})".format(
          p["max_len"], p["vocab"], *p["examples"]))

  def derive(c):
    rope = registry.compatible(c.model.attention, "rope")
    c.model.position = "rope" if rope else "none"
    c.model.attention = f"conv;{c.model.attention}"

  return grids.Grid(
      name="copying", title="Copying with length generalisation",
      description=__doc__.split("\n\n", 1)[0].replace("\n", " "),
      base=config,
      axes={"seed": [0, 1, 2], "model.attention": p["families"],
            "learning_rate": p["lrs"]},
      analysis=grids.Analysis(
          metric="eval_accuracy", line=("model.attention",),
          best_over=("learning_rate",), success_threshold=THRESHOLD,
          reference_line="standard"),
      derive=derive, baselines=baselines, analyze=analyze)


def baselines(config) -> dict[str, float]:
  """Chance: a symbol drawn uniformly."""
  _, args = registry.parse(config.data.task)
  return {"chance (uniform symbol)": 1 / (args.get("vocab_size", 32) - 2)}


def analyze(records: list[dict], folder: str) -> str:
  """Accuracy at each test length per family (at its chosen learning
  rate), beside the information a string holds and the family's state."""
  analysis = grids.Analysis(metric="eval_accuracy",
                            best_over=("learning_rate",))
  rows = [r for r in report.summarize(records, analysis) if r["n"]]
  if not rows:
    return ""
  table, curves = [], {}
  for r in rows:
    label = ", ".join(str(v) for v in r["line"])
    values = {split: report.mean_ci([c["tests"][f"{split}_accuracy"]
                                     for c in r["cells"]
                                     if f"{split}_accuracy" in c["tests"]])
              for split in SPLITS}
    curves[label] = values
    state = r["cells"][0].get("state_floats_per_layer")
    table.append([label, f"{state:.0f}" if state else "-"]
                 + [report.format_ci(*values[s]) for s in SPLITS])
  header = (["attention", "decode state floats/layer"]
            + [f"accuracy at {scale:g}x (`{split}`)"
               for split, scale in SPLITS.items()])
  _plot(os.path.join(folder, "copying_lengths.png"), curves)
  return ("## Accuracy against string length\n\nPer-symbol accuracy of "
          "the copy on each test split (strings of about 1x, 1.5x and 2x "
          "the longest training string), mean ± 95% interval over seeds at "
          "each family's chosen learning rate. A string of L symbols out "
          "of S holds L log2 S bits.\n\n"
          + report.markdown_table(header, table)
          + "\n\n![lengths](copying_lengths.png)")


def _plot(path: str, curves: dict):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  scales = list(SPLITS.values())
  for label, values in curves.items():
    means = [values[s][0] for s in SPLITS]
    halves = [0 if math.isnan(values[s][1]) else values[s][1] for s in SPLITS]
    ax.errorbar(scales, means, yerr=halves, marker="o", capsize=3,
                label=label)
  ax.set(xlabel="string length / longest training string",
         ylabel="copy accuracy", xticks=scales)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
