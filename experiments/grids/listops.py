"""ListOps (the Long Range Arena design, CPU-sized): every attention family
on the same encoder, at matched key budgets, against LRA's published
accuracies (Tay et al. 2021, Table 1).

  python -m experiments.sweep --grid=experiments/grids/listops.py
  python -m experiments.sweep --grid=experiments/grids/listops.py \
      --preset=quick --out=/tmp/listops

LRA trains on its released files at length 2000 (the `full` preset's
shape; point `data.task` at them with `listops(path=DIR)`); the CPU
presets generate expressions with the same generator up to
`data.seq_len` tokens. Local, sparse and bigbird get the largest window /
block with which a query sees at most KEYS[preset] keys
(`grids.at_budget`); dense and linear attention see every key. Always
answering the most common label (0) scores 16.5% on generated expressions
of up to 128 tokens (3000 drawn); LRA's chance is about 17%.

The CPU preset's step count is sized so that standard attention learns
past the majority label within a preset's CPU budget
(experiments/grids/__init__.py); the sizing runs are in
experiments/results/listops/RESULTS.md, "Notes from earlier runs".
"""

import collections
import functools

import numpy as np

from configs import listops as listops_config
from experiments import grids
from zoo import registry
from zoo.data import listops

# LRA Table 1, ListOps test accuracy, by our family.
LRA = {"standard": ("Transformer", 0.3637), "local": ("Local Att", 0.1582),
       "sparse": ("Sparse Trans.", 0.1707), "bigbird": ("BigBird", 0.3605),
       "linear(feature='elu')": ("Linear Trans.", 0.1613),
       "linear(feature='favor')": ("Performer", 0.1801)}

# (seq_len, layers, width, heads, steps, batch, training and eval examples)
SIZES = {"quick": (64, 1, 32, 2, 30, 16, 1000, 256),
         "cpu": (128, 2, 64, 4, 1000, 32, 20000, 1000),
         "full": (2048, 4, 512, 8, 5000, 32, 96000, 2000)}
KEYS = {"quick": 16, "cpu": 32, "full": 256}


def get_grid(preset: str) -> grids.Grid:
  seq_len, layers, width, heads, steps, batch, train, evals = SIZES[preset]
  config = listops_config.get_config()
  config.num_train_steps = steps
  config.batch_size = batch
  config.warmup_steps = max(1, steps // 10)
  config.log_every_steps = max(1, steps // 10)
  config.eval_every_steps = steps
  config.checkpoint_every_steps = max(1, steps // 4)
  config.max_checkpoints_to_keep = 1
  grids.set_model(config, layers=layers, width=width, heads=heads)
  config.data.seq_len = seq_len
  config.data.task = f"listops(num_train={train}, num_eval={evals})"

  def derive(c):
    c.model.attention = grids.at_budget(c.model.attention, KEYS[preset],
                                        c.data.seq_len, causal=False)

  return grids.Grid(
      name="listops", title="ListOps accuracy per attention family",
      description=__doc__.split("\n\n", 1)[0].replace("\n", " "),
      base=config,
      axes={"model.attention": grids.FAMILIES, "seed": [0, 1, 2]},
      analysis=grids.Analysis(
          metric="eval_accuracy", line=("model.attention",), reference=LRA,
          reference_source="LRA, Tay et al. 2021, length 2000"),
      derive=derive, baselines=baselines)


def baselines(config) -> dict[str, float]:
  """Accuracy of two rules that read no nesting, on the test split's
  expressions (generated data only)."""
  _, args = registry.parse(config.data.task)
  if "path" in args:
    return {}
  task = registry.build("task", config.data.task, seq_len=config.data.seq_len)
  c = task.config
  return _baselines(c.seq_len, c.min_len, c.max_depth, c.max_args,
                    c.num_eval, c.seed)


@functools.lru_cache(maxsize=None)
def _baselines(seq_len, min_len, max_depth, max_args, count, seed):
  examples = [listops.listops_example(
      np.random.default_rng((seed, 1, i)), seq_len=seq_len, min_len=min_len,
      max_depth=max_depth, max_args=max_args) for i in range(count)]
  labels = [int(ex["label"]) for ex in examples]
  majority = collections.Counter(labels).most_common(1)[0][0]
  root = [root_rule(ex["inputs"]) for ex in examples]
  return {"majority label": float(np.mean(np.equal(labels, majority))),
          "root operator on its digits": float(np.mean(np.equal(labels,
                                                                root)))}


def root_rule(inputs) -> int:
  """The root operator applied to its digit children, nested lists
  ignored (0 when the root has no digit child)."""
  names = [listops.VOCAB[i] for i in inputs if i]
  digits, depth = [], 0
  for name in names[1:]:
    if name in listops.OPERATORS:
      depth += 1
    elif name == "]":
      depth -= 1
    elif depth == 0:
      digits.append(int(name))
  if not digits:
    return 0
  return listops.evaluate((names[0], digits))
