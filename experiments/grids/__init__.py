"""Sweep grids: one file per experiment, each "a grid plus its analysis".

A grid file defines `get_grid(preset)` (or `get_grid(preset, arg)`, given
`--grid=FILE:ARG` as ml_collections config files take `--config=FILE:ARG`)
returning a `Grid`. Presets: "quick" (the whole sweep in a few minutes on
2 CPU cores: checks the pipeline, not the science), "cpu" (the default:
about 90 minutes on 2 CPU cores), "full" (accelerator size). The harness,
experiments/sweep.py, runs the cells; experiments/report.py writes the
results.
"""

import dataclasses
import functools
import itertools
from typing import Any, Callable

import ml_collections

from configs import default
from zoo import registry

PRESETS = ("quick", "cpu", "full")

# Every attention family the experiments compare (the mission's standard,
# local, sparse and linear, with BigBird and both linear feature maps).
FAMILIES = ["standard", "local", "sparse", "bigbird",
            "linear(feature='elu')", "linear(feature='favor')"]

# The argument that sets each attention family's key budget; the other
# families (dense, linear) see every visible key.
BUDGET_ARGS = {"local": "window", "sparse": "block", "bigbird": "block"}


@dataclasses.dataclass
class Analysis:
  """How finished cells become tables and plots.

  A cell's value is the last logged `metric` in its metrics.jsonl. Cells
  differing only in `seed` are averaged (mean and 95% Student-t interval);
  every other axis must be one of `panels` (a table and a plot panel per
  value), `line` (a table row and plot line per value), `x` (the plot's x
  axis and the table's columns; None draws bars) or `best_over` (for each
  row, the value whose mean over seeds is best is kept and named, e.g. the
  learning rate, as Zoology reports the best over a learning-rate sweep).
  `reference` holds published numbers by row label, as (source name,
  value in the metric's units). `time_views` adds the equal wall-clock
  view (every row's metric at the training seconds of the panel's quickest
  cell, read off each cell's eval curve) and the Pareto plot of the metric
  against training tokens/s.

  The value a row reports is the test split's metric where the task has
  one; the best of `best_over` is chosen on the last evaluation (the
  validation split). `success_threshold` counts, per row, the seeds whose
  value meets it, and gives each cell the first evaluated step that did
  (steps to threshold). `reference_line` (a line label, e.g. "standard")
  adds every row's paired difference from the reference row of its panel
  and x, over the seeds both finished. `x_value` plots against a record's
  field (e.g. "state_floats_per_layer") instead of the x axis's value.
  """

  metric: str
  higher_is_better: bool = True
  line: tuple[str, ...] = ("model.attention",)
  x: str | None = None
  panels: tuple[str, ...] = ()
  best_over: tuple[str, ...] = ()
  reference: dict[str, tuple[str, float]] = dataclasses.field(
      default_factory=dict)
  reference_source: str = ""
  time_views: bool = False
  success_threshold: float | None = None
  reference_line: str = ""
  x_value: str = ""

  def first_success(self, curve) -> int | None:
    """The first step of an eval curve [(step, value), ...] whose value
    meets `success_threshold`, or None."""
    if self.success_threshold is None:
      return None
    for step, value in curve:
      if (value >= self.success_threshold if self.higher_is_better
          else value <= self.success_threshold):
        return step
    return None


@dataclasses.dataclass
class Grid:
  """A base config, axes of overrides, and the analysis of the results.

  `axes` maps dotted config keys to value lists and expands to their
  product; a list of such dicts is the union of their products (e.g. every
  attention family at one position, plus every position with one family).
  `derive(config)`, if given, completes each cell's config after its
  overrides (e.g. sets a local window from the cell's length and the key
  budget); the cell keeps its axis values as labels. `analyze(records,
  folder)`, if given, is the experiment's own analysis beyond the tables
  (e.g. fitted scaling laws): given every cell's record (experiments/
  sweep.py `record`), it saves its plots into `folder` and returns
  markdown for RESULTS.md. `baselines(config)` gives a cell's chance and
  trivial baselines ({name: value in the metric's units}), shown on its
  panel's table and plot; `ceiling(config)` the most a cell's attention
  can score (e.g. the share of queries whose answer lies within a pattern
  op's keys), or None.
  """

  name: str
  title: str
  description: str
  base: ml_collections.ConfigDict
  axes: dict[str, list] | list[dict[str, list]]
  analysis: Analysis
  derive: Callable[[ml_collections.ConfigDict], None] | None = None
  analyze: Callable[[list[dict], str], str] | None = None
  baselines: Callable[[ml_collections.ConfigDict], dict[str, float]] | None = (
      None)
  ceiling: Callable[[ml_collections.ConfigDict], float | None] | None = None

  def products(self) -> list[dict[str, list]]:
    return self.axes if isinstance(self.axes, list) else [self.axes]

  def axis_keys(self) -> list[str]:
    """Every axis key, in order of first appearance."""
    return list(dict.fromkeys(k for p in self.products() for k in p))

  def check(self):
    """Raises ValueError unless each axis is the seed or used by the
    analysis exactly once, and the analysis options fit together."""
    a = self.analysis
    roles = list(a.panels) + list(a.line) + list(a.best_over) + (
        [a.x] if a.x else [])
    for key in self.axis_keys():
      if key != "seed" and roles.count(key) != 1:
        raise ValueError(
            f"grid {self.name}: axis {key!r} must appear exactly once in the "
            "analysis's panels, line, x or best_over (else cells that differ "
            "in it would be averaged as seeds)")
    unknown = set(roles) - set(self.axis_keys())
    if unknown:
      raise ValueError(f"grid {self.name}: analysis names {sorted(unknown)}, "
                       "which are not axes")
    if a.time_views and (a.x or a.best_over):
      raise ValueError(f"grid {self.name}: time_views needs x=None and no "
                       "best_over")


def overrides(grid: Grid) -> list[dict[str, Any]]:
  """Every cell's overrides, in a fixed order (products in order, axes in
  order, the last axis varying fastest); duplicates from overlapping
  products are dropped."""
  out, seen = [], set()
  for product in grid.products():
    keys = list(product)
    for values in itertools.product(*(product[k] for k in keys)):
      cell = dict(zip(keys, values))
      marker = repr(sorted(cell.items()))
      if marker not in seen:
        seen.add(marker)
        out.append(cell)
  return out


def sizes(limit: int) -> list[int]:
  """Candidate window and block sizes up to `limit`, four per octave
  (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, 19, 23, 27, 32, ...)."""
  out, k = set(), 0
  while round(2 ** (k / 4)) <= limit:
    out.add(round(2 ** (k / 4)))
    k += 1
  return sorted(out)


def spec(name: str, kwargs: dict[str, Any]) -> str:
  """`spec("local", {"window": 32})` -> `"local(window=32)"`."""
  if not kwargs:
    return name
  return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


@functools.lru_cache(maxsize=None)
def at_budget(attention: str, keys: float, t: int, causal: bool) -> str:
  """`attention` with its size argument (BUDGET_ARGS) set to the largest of
  `sizes(t)` with which one query sees at most `keys` keys at length t
  (`keys_per_query`), or, if none is that small, to the size with the
  fewest. Largest, because the Sparse Transformer's budget l + T / l falls
  and then rises with the block l: this picks the rising branch, where the
  block holds the local context. A spec that sets the argument itself, or
  a family without one, is returned unchanged."""
  name, kwargs = registry.parse(attention)
  arg = BUDGET_ARGS.get(name)
  if arg is None or arg in kwargs:
    return attention
  budgets = {size: registry.build("attention", spec(name, {
      **kwargs, arg: size})).keys_per_query(t, causal) for size in sizes(t)}
  within = [size for size, b in budgets.items() if b <= keys]
  return spec(name, {**kwargs, arg: max(within) if within else min(
      budgets, key=budgets.get)})


def recall_config(*, steps: int, batch: int, threshold: float):
  """The default config for a recall grid (MQAR, copying): 2 layers,
  `steps` steps of `batch` sequences with 20 evaluations, warmup a
  twentieth of them, a checkpoint every quarter (one kept), stopping at
  `threshold` validation accuracy."""
  config = default.get_config()
  config.batch_size = batch
  config.max_checkpoints_to_keep = 1
  config.num_train_steps = steps
  config.warmup_steps = max(1, steps // 20)
  config.log_every_steps = max(1, steps // 20)
  config.eval_every_steps = max(1, steps // 20)
  config.checkpoint_every_steps = max(1, steps // 4)
  config.early_stop = f"eval_accuracy>={threshold}"
  config.model.num_layers = 2
  return config


def set_model(config, *, layers: int, width: int, heads: int):
  """The model size of a grid's base config: MLP 4x the width, as many kv
  heads as heads."""
  m = config.model
  m.num_layers, m.embed_dim, m.mlp_dim = layers, width, 4 * width
  m.num_heads = m.num_kv_heads = heads
