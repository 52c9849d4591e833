"""Byte-level language modelling on a text file: bits per byte of every
attention family (with sinusoidal positions, which every family takes) and
of every position encoding (with standard attention), at equal steps and at
equal training time, and bits per byte against training tokens/s (the Pareto
plot).

  python -m experiments.sweep \
      --grid=experiments/grids/text.py:/path/to/file.txt
  python -m experiments.sweep \
      --grid=experiments/grids/text.py:/path/to/file.txt --preset=quick \
      --out=/tmp/text

The file comes after the colon (as configs/text.py takes it); its last 10%
is the eval split. Local, sparse and bigbird get the largest window /
block with which a query sees at most KEYS[preset] keys
(`grids.at_budget`). Training time is steps over the cell's training
speed (its median logged window without an evaluation), leaving out
compilation and evaluation; on a shared machine it carries the other
jobs' noise, which the intervals over seeds show.

The CPU preset's step count is sized to a preset's CPU budget
(experiments/grids/__init__.py); the sizing runs are in
experiments/results/text/RESULTS.md, "Notes from earlier runs".
"""

import functools

from configs import text as text_config
from experiments import grids, ngram
from zoo import registry

POSITIONS = ["none", "sinusoidal", "learned", "rope", "alibi", "t5"]

# (seq_len, layers, width, heads, steps, batch, evaluations)
SIZES = {"quick": (64, 1, 32, 2, 20, 16, 2),
         "cpu": (128, 2, 64, 4, 640, 32, 8),
         "full": (1024, 6, 384, 6, 10000, 64, 10)}
KEYS = {"quick": 16, "cpu": 32, "full": 128}


def get_grid(preset: str, text_path: str = "") -> grids.Grid:
  if not text_path:
    raise ValueError("the text grid needs a file: "
                     "--grid=experiments/grids/text.py:PATH")
  seq_len, layers, width, heads, steps, batch, evals = SIZES[preset]
  config = text_config.get_config(text_path)
  config.num_train_steps = steps
  config.batch_size = batch
  config.warmup_steps = max(1, steps // 10)
  # Every other logged window evaluates; the others time training alone.
  config.log_every_steps = max(1, steps // (2 * evals))
  config.eval_every_steps = 2 * config.log_every_steps
  config.checkpoint_every_steps = max(1, steps // 4)
  config.max_checkpoints_to_keep = 1
  grids.set_model(config, layers=layers, width=width, heads=heads)
  config.data.seq_len = seq_len

  def derive(c):
    c.model.attention = grids.at_budget(c.model.attention, KEYS[preset],
                                        c.data.seq_len, causal=True)

  seeds = [0, 1, 2]
  return grids.Grid(
      name="text", title="Byte-level LM: attention families and positions",
      description=(__doc__.split("\n\n", 1)[0].replace("\n", " ")
                   + f" Text: `{text_path}`."),
      base=config,
      axes=[{"model.attention": grids.FAMILIES,
             "model.position": ["sinusoidal"],
             "seed": seeds},
            {"model.attention": ["standard"], "model.position": POSITIONS,
             "seed": seeds}],
      analysis=grids.Analysis(
          metric="eval_bits_per_token", higher_is_better=False,
          line=("model.attention", "model.position"), time_views=True),
      derive=derive, baselines=baselines)


def baselines(config) -> dict[str, float]:
  """Smoothed 2-, 3- and 4-gram bits per byte on the cell's eval split."""
  _, args = registry.parse(config.data.task)
  return _ngrams(args["path"], config.data.seq_len,
                 args.get("eval_fraction", 0.1))


@functools.lru_cache(maxsize=None)
def _ngrams(path: str, seq_len: int, eval_fraction: float):
  return ngram.baselines(path, seq_len, eval_fraction)
