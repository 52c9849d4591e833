"""The sweep harness: a grid file's cells, each one `train_and_evaluate` run
in its own workdir, then the report (experiments/report.py).

  python -m experiments.sweep --grid=experiments/grids/mqar.py   # cpu preset
  python -m experiments.sweep --grid=experiments/grids/mqar.py --preset=quick \
      --out=/tmp/mqar
  python -m experiments.sweep --grid=... --task_index=$I --num_tasks=$N
  python -m experiments.sweep --grid=... --report_only

A cell's workdir, OUT/cells/NAME, holds what the trainer writes
(metrics.jsonl, config.json, checkpoints/) plus DONE (JSON: the finishing
session's wall seconds and device) or FAILED (the one-line error). Rerunning
the same command skips cells with either file and resumes an interrupted
cell from its newest checkpoint, so a sweep killed at any moment loses at
most the steps since that checkpoint; --retry_failed runs the failed cells
again from scratch. Task i of --num_tasks=n runs cells i, i + n, i + 2n, ...
of the grid's fixed order, so an array job (Slurm, Kubernetes indexed jobs)
with a shared OUT spreads a sweep over machines with no coordinator. One
task (n = 1) writes the report when it ends; with n > 1, --report_only
writes it from whatever cells have finished, at any time.
"""

import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx

from configs import default
from experiments import grids, provenance, report
from zoo import (checkpoint, host_memory, layers, metrics, plan, registry,
                 train, xla_flags)
from zoo.models import transformer

DONE, FAILED = "DONE", "FAILED"


@dataclasses.dataclass
class Cell:
  """One run of the sweep: `axes` are its labels (every axis key of the
  grid, with the base config's value where its product has no such axis);
  `error` is set when its config could not be built."""

  name: str
  axes: dict[str, Any]
  config: ml_collections.ConfigDict
  error: str = ""


def load_grid(arg: str, preset: str) -> grids.Grid:
  """The Grid of `FILE` or `FILE:ARG` (passed to get_grid after the
  preset), checked."""
  path, _, extra = arg.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--grid={arg}: no grid file {path!r}")
  module_name = "zoo_grid_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  grid = module.get_grid(preset, extra) if extra else module.get_grid(preset)
  grid.check()
  return grid


def one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(
      error).__name__


def _set(config, key: str, value):
  *parents, last = key.split(".")
  for part in parents:
    if part not in config:
      raise ValueError(f"no config key {key!r}")
    config = config[part]
  if last not in config:
    raise ValueError(f"no config key {key!r}")
  config[last] = value


def _get(config, key: str):
  """The value at a dotted key, or None where there is none."""
  for part in key.split("."):
    if part not in config:
      return None
    config = config[part]
  return config


def cell_name(overrides: dict[str, Any]) -> str:
  """A readable folder name from the overrides, with a hash of them so
  names stay distinct after shortening."""
  text = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())
  text = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", text).strip("_")[:120]
  digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode())
  return f"{text}-{digest.hexdigest()[:8]}"


def expand(grid: grids.Grid) -> list[Cell]:
  """Every cell of the grid, in its fixed order."""
  keys = grid.axis_keys()
  cells = []
  for overrides in grids.overrides(grid):
    config = copy.deepcopy(grid.base)
    axes = {k: overrides[k] if k in overrides else _get(grid.base, k)
            for k in keys}
    error = ""
    try:
      for key, value in overrides.items():
        _set(config, key, value)
      if grid.derive:
        grid.derive(config)
    except (TypeError, ValueError) as e:
      error = one_line(e)
    cells.append(Cell(cell_name(overrides), axes, config, error))
  return cells


def shard(cells: list[Cell], task_index: int, num_tasks: int) -> list[Cell]:
  """Task `task_index`'s cells: every `num_tasks`-th from its index."""
  if not 0 <= task_index < num_tasks:
    raise ValueError(f"--task_index={task_index} must be in "
                     f"[0, --num_tasks={num_tasks})")
  return cells[task_index::num_tasks]


def status(workdir: str) -> str:
  """done, failed, interrupted (started, not finished) or pending."""
  if os.path.exists(os.path.join(workdir, DONE)):
    return "done"
  if os.path.exists(os.path.join(workdir, FAILED)):
    return "failed"
  if os.path.exists(os.path.join(workdir, "config.json")):
    return "interrupted"
  return "pending"


def _write_atomic(path: str, text: str):
  """Writes `path` whole or not at all; the temporary name is this
  process's own, as the tasks of an array job share the cells folder."""
  tmp = f"{path}.{platform.node()}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def check_unchanged(cells: list[Cell], root: str):
  """Raises ValueError if a started cell ran another config than the grid
  now gives it (the grid file was edited): its results would be mixed.
  Failed cells are exempt: a retry starts them afresh. A key the trainer
  gained since the cell ran, at its default (configs/default.py), is no
  change: a new key's default keeps the old behaviour."""
  defaults = _flat(default.get_config().to_dict())
  for cell in cells:
    path = os.path.join(root, cell.name, "config.json")
    if (cell.error or not os.path.exists(path)
        or status(os.path.join(root, cell.name)) == "failed"):
      continue
    with open(path) as f:
      ran = _flat(json.load(f))
    now = _flat(json.loads(cell.config.to_json()))
    added = {k for k in now.keys() - ran.keys()
             if k in defaults and now[k] == defaults[k]}
    changed = sorted(k for k in ran.keys() | now.keys() - added
                     if ran.get(k) != now.get(k))
    if changed:
      raise ValueError(
          f"cell {cell.name} in {root} ran another config (changed: "
          f"{', '.join(changed)}); give a new --out or delete the cell")


def run_cell(cell: Cell, workdir: str) -> str:
  """Trains (or resumes) one cell; returns done, failed or preempted (the
  trainer saved and returned early on SIGTERM). DONE records the session's
  wall seconds, device and provenance (commit, versions, load at start)."""
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  made = provenance.provenance(load=os.getloadavg()[0])
  error = cell.error
  if not error:
    try:
      train.train_and_evaluate(cell.config, workdir)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("cell %s failed", cell.name)
      error = one_line(e)
    finally:
      jax.clear_caches()
  if error:
    logging.error("cell %s failed: %s", cell.name, error)
    _write_atomic(os.path.join(workdir, FAILED), error + "\n")
    return "failed"
  rows = metrics.read(workdir)
  if not rows or (rows[-1]["step"] < cell.config.num_train_steps
                  and not plan.early_stop_reached(cell.config.early_stop,
                                                  rows[-1])):
    return "preempted"
  _write_atomic(os.path.join(workdir, DONE), json.dumps({
      "wall_s": time.time() - start,
      "device": jax.devices()[0].device_kind,
      "device_count": jax.device_count(), **made}))
  return "done"


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
          else f"{seconds // 60}m{seconds % 60:02d}s")


def run(cells: list[Cell], root: str, retry_failed: bool = False) -> bool:
  """Runs this task's unfinished cells in order with progress and ETA;
  returns False if preempted."""
  states = {c.name: status(os.path.join(root, c.name)) for c in cells}
  skip = {"done"} | (set() if retry_failed else {"failed"})
  todo = [c for c in cells if states[c.name] not in skip]
  finished = len(cells) - len(todo)
  logging.info("sweep: %d cells in this task: %d done, %d failed, %d to run",
               len(cells), sum(s == "done" for s in states.values()),
               sum(s == "failed" for s in states.values()), len(todo))
  start = time.time()
  for i, cell in enumerate(todo):
    workdir = os.path.join(root, cell.name)
    if states[cell.name] == "failed":
      shutil.rmtree(workdir)
    cell_start = time.time()
    outcome = run_cell(cell, workdir)
    if outcome == "preempted":
      logging.warning("sweep: preempted in cell %s; rerun the same command "
                      "to resume", cell.name)
      return False
    per_cell = (time.time() - start) / (i + 1)
    logging.info("sweep: %d/%d cells done; %s %s in %s; ETA %s",
                 finished + i + 1, len(cells), cell.name, outcome,
                 _duration(time.time() - cell_start),
                 _duration(per_cell * (len(todo) - i - 1)))
  return True


def _causal(task_spec: str) -> bool:
  return registry.get("task", registry.parse(task_spec)[0]).model == "lm"


def _fill(config: dict, defaults: dict):
  """Adds to `config`, in place and at every depth, the keys it lacks."""
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, dict) and isinstance(config[key], dict):
      _fill(config[key], value)


@functools.lru_cache(maxsize=None)
def _parameter_counts(config_json: str) -> dict[str, int]:
  """Total and non-embedding parameters of a config's model (abstract: no
  arrays are made); keys the trainer gained since the cell ran take their
  defaults."""
  config = json.loads(config_json)
  _fill(config, default.get_config().to_dict())
  p = plan.resolve(ml_collections.ConfigDict(config))
  return transformer.parameter_counts(nnx.eval_shape(p.model_fn))


def record(cell: Cell, root: str, grid: grids.Grid) -> dict:
  """What the report needs of a cell: status, error, and for a finished
  cell: its `value` (the test split's metric when the task has one, else
  the last evaluation's), `selection_value` (the last evaluation: the
  validation split, on which rows pick their best learning rate), its
  eval curve of (step, training seconds, value), `steps_to_threshold` (the
  first evaluated step meeting the analysis's success threshold, or None),
  its training tokens/s (the median logged window, leaving out the first,
  which holds warm-up, and those that hold an evaluation), its training
  seconds at that speed (compilation, evaluation and checkpoints left out:
  what a longer run spends per step), the tokens per step, the parameter
  counts (zoo.models.transformer.parameter_counts), the attention as run,
  its key budget and decode state (zoo.layers.stack_budget), every test
  split's metrics of the last row (`tests`), and the grid's baselines and
  ceiling for it."""
  metric = grid.analysis.metric
  workdir = os.path.join(root, cell.name)
  r = {"name": cell.name, "axes": cell.axes, "status": status(workdir)}
  if r["status"] == "failed":
    with open(os.path.join(workdir, FAILED)) as f:
      r["error"] = f.read().strip()
  if r["status"] != "done":
    return r
  with open(os.path.join(workdir, DONE)) as f:
    r.update(json.load(f))
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  rows = metrics.read(workdir)
  curve = [(row["step"], row[metric]) for row in rows if metric in row]
  if not curve:
    return {**r, "status": "failed",
            "error": f"no {metric} in metrics.jsonl (keys: "
                     f"{', '.join(sorted(rows[-1]))})"}
  test_key = "test_" + metric.removeprefix("eval_")
  # Windows holding an evaluation count its time; the first, warm-up.
  steady = [row["tokens_per_s"] for row in rows[1:] if metric not in row]
  steady = sorted(steady or [row["tokens_per_s"] for row in rows])
  tokens_per_s = steady[len(steady) // 2]
  seconds_per_step = (config["batch_size"] * config["data"]["seq_len"]
                      / tokens_per_s)
  m = config["model"]
  r.update(value=rows[-1].get(test_key, curve[-1][1]),
           value_split="test" if test_key in rows[-1] else "eval",
           selection_value=curve[-1][1],
           steps_to_threshold=grid.analysis.first_success(curve),
           train_s=rows[-1]["step"] * seconds_per_step,
           tokens_per_s=tokens_per_s,
           tokens_per_step=config["batch_size"] * config["data"]["seq_len"],
           params=_parameter_counts(json.dumps(
               {**config, "seed": 0}, sort_keys=True)),  # same for any seed
           curve=[(step, step * seconds_per_step, v) for step, v in curve],
           attention=m["attention"],
           **layers.stack_budget(
               m["attention"], m["num_layers"], config["data"]["seq_len"],
               _causal(config["data"]["task"]), m["num_kv_heads"],
               m["embed_dim"] // m["num_heads"]),
           tests={k: v for k, v in rows[-1].items() if k.startswith("test")},
           baselines=grid.baselines(cell.config) if grid.baselines else {},
           ceiling=grid.ceiling(cell.config) if grid.ceiling else None)
  return r


def sweep_command(grid: str, preset: str, out: str, cells: str) -> str:
  """The command that runs the whole sweep (any --task_index split of it
  gives the same cells)."""
  args = [f"--grid={grid}", f"--preset={preset}"]
  args += [f"--out={out}"] if out else []
  args += [f"--cells={cells}"] if cells else []
  return " ".join(["python -m experiments.sweep"] + [shlex.quote(a)
                                                     for a in args])


def main(argv):
  del argv
  # As the trainer runs (see zoo/xla_flags.py and zoo/host_memory.py).
  xla_flags.apply()
  host_memory.retain()
  logging.get_absl_handler().addFilter(checkpoint.quiet_orbax)
  f = flags.FLAGS
  try:
    grid = load_grid(f.grid, f.preset)
    cells = expand(grid)
    out = report.results_dir(grid.name, f.out)
    root = f.cells or os.path.join(out, "cells")
    mine = shard(cells, f.task_index, f.num_tasks)
    check_unchanged(mine, root)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not f.report_only:
    os.makedirs(root, exist_ok=True)
    # A finished cell's files are small and kept with the results; its
    # checkpoints, events and the compilation cache are not.
    _write_atomic(os.path.join(root, ".gitignore"),
                  "checkpoints/\ntensorboard/\n.jax_cache/\n*.tmp\n")
    # Cells that differ only in seed compile the same programs: a
    # persistent cache (per host, as compiled CPU code may not move
    # between machines) compiles them once.
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        root, ".jax_cache", platform.node()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if not run(mine, root, f.retry_failed) or f.num_tasks > 1:
      return
  records = [record(c, root, grid) for c in cells]
  report.write_sweep(grid, records,
                     cmd=sweep_command(f.grid, f.preset, f.out, f.cells),
                     preset=f.preset, out_dir=out)


def _define_flags():
  """Flags; defined only when run as a program, so importing this module
  (tests, notebooks) defines none."""
  flags.DEFINE_string("grid", None, "Grid file (FILE or FILE:ARG).",
                      required=True)
  flags.DEFINE_enum("preset", "cpu", list(grids.PRESETS), "Grid size.")
  flags.DEFINE_string("out", "", "Report folder (default "
                      "experiments/results/GRID_NAME).")
  flags.DEFINE_string("cells", "", "Folder of the cells' workdirs (default "
                      "OUT/cells).")
  flags.DEFINE_integer("task_index", 0, "This task's index in an array job.")
  flags.DEFINE_integer("num_tasks", 1, "Tasks in the array job.")
  flags.DEFINE_bool("report_only", False, "Write the report from the "
                    "finished cells; run nothing.")
  flags.DEFINE_bool("retry_failed", False, "Run failed cells again.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
