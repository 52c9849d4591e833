"""The sweep harness: grid expansion, sharding, failed cells, and resume
after the sweep is killed mid-cell."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import report, sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# A grid file: the tiny test config (tests/conftest.py) with given axes.
GRID = '''
from configs import default
from experiments import grids


def get_grid(preset):
  config = default.get_config()
  config.num_train_steps = {steps}
  config.batch_size = 8
  config.log_every_steps = 2
  config.eval_every_steps = {steps}
  config.checkpoint_every_steps = {checkpoint_every}
  config.warmup_steps = 1
  config.model.num_layers = 1
  config.model.embed_dim = 32
  config.model.mlp_dim = 64
  config.data.seq_len = 32
  config.data.task = ("mqar(num_pairs=4, vocab_size=32, num_train=512, "
                      "num_eval=64)")
  config.data.dir = {data_dir!r}
  config.mesh.data = 1
  return grids.Grid(
      name="tiny", title="Tiny sweep", description="A test grid.",
      base=config, axes={axes!r},
      analysis=grids.Analysis(metric="eval_accuracy",
                              line=("model.num_layers",)))
'''


def write_grid(tmp_path, data_dir, axes, steps=3, checkpoint_every=3):
  path = tmp_path / "grid.py"
  path.write_text(GRID.format(steps=steps, checkpoint_every=checkpoint_every,
                              data_dir=data_dir, axes=axes))
  return str(path)


def test_expansion_order_labels_and_errors(tmp_path, data_dir):
  axes = [{"model.num_layers": [1, 2], "seed": [0, 1, 2]},
          {"model.num_layers": [2, 3], "seed": [0], "learning_rate": [0.01]},
          {"model.num_layers": [1], "seed": [0]},  # already in the first
          {"model.num_layers": ["two"], "seed": [0]},
          {"model.no_such_key": [1], "seed": [0]}]
  grid = sweep.load_grid(write_grid(tmp_path, data_dir, axes[:1]), "cpu")
  grid.axes = axes
  cells = sweep.expand(grid)
  assert [(c.axes["model.num_layers"], c.axes["seed"]) for c in cells] == [
      (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 0), (3, 0),
      ("two", 0), (1, 0)]
  assert cells[6].config.learning_rate == 0.01 == cells[6].axes[
      "learning_rate"]
  assert cells[0].axes["learning_rate"] == cells[0].config.learning_rate
  assert cells[4].config.model.num_layers == 2 and cells[4].config.seed == 1
  assert len({c.name for c in cells}) == len(cells)
  assert not any(c.error for c in cells[:8])
  assert "TypeError" in cells[8].error
  assert "no config key 'model.no_such_key'" in cells[9].error
  assert [c.name for c in sweep.expand(grid)] == [c.name for c in cells]


def test_analysis_must_cover_every_axis(tmp_path, data_dir):
  grid = sweep.load_grid(write_grid(tmp_path, data_dir, {
      "model.num_layers": [1], "seed": [0]}), "cpu")
  grid.axes = {"model.num_layers": [1], "learning_rate": [0.1], "seed": [0]}
  with pytest.raises(ValueError, match="'learning_rate' must appear"):
    grid.check()


def test_edited_grid_is_refused_but_a_new_default_key_is_not(tmp_path,
                                                            data_dir):
  """A started cell whose config.json differs from the grid's config is
  refused; a key missing from config.json (the trainer gained it since)
  passes at its default and is refused at any other value."""
  grid = sweep.load_grid(write_grid(tmp_path, data_dir, {
      "model.num_layers": [1], "seed": [0]}), "cpu")
  cell = sweep.expand(grid)[0]
  root = tmp_path / "cells"
  (root / cell.name).mkdir(parents=True)
  ran = json.loads(cell.config.to_json())
  del ran["lr_schedule"]
  (root / cell.name / "config.json").write_text(json.dumps(ran))
  sweep.check_unchanged([cell], str(root))
  cell.config.lr_schedule = "constant"
  with pytest.raises(ValueError, match=r"ran another config \(changed: "
                     r"lr_schedule\)"):
    sweep.check_unchanged([cell], str(root))
  cell.config.lr_schedule = "cosine"
  cell.config.learning_rate = 0.5
  with pytest.raises(ValueError, match="changed: learning_rate"):
    sweep.check_unchanged([cell], str(root))


def test_parameter_counts_of_a_config_from_before_a_new_key():
  """A cell's config.json lacking keys the trainer has since gained (here
  lr_schedule and model.dtype) still gives its model's counts."""
  from configs import default
  ran = default.get_config().to_dict()
  del ran["lr_schedule"], ran["model"]["dtype"]
  counts = sweep._parameter_counts(json.dumps(ran, sort_keys=True))
  assert 0 < counts["non_embedding"] < counts["total"]


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 7, 12])
def test_shards_partition_the_cells(tmp_path, data_dir, num_tasks):
  grid = sweep.load_grid(write_grid(tmp_path, data_dir, {
      "model.num_layers": [1, 2, 3], "seed": [0, 1, 2, 3]}), "cpu")
  names = [c.name for c in sweep.expand(grid)]
  shards = [[c.name for c in sweep.shard(sweep.expand(grid), i, num_tasks)]
            for i in range(num_tasks)]
  assert sorted(n for s in shards for n in s) == sorted(names)
  assert len({n for s in shards for n in s}) == len(names)
  with pytest.raises(ValueError, match="task_index"):
    sweep.shard(sweep.expand(grid), num_tasks, num_tasks)


@pytest.mark.slow
def test_failed_cell_is_reported_and_not_retried(tmp_path, data_dir):
  grid = sweep.load_grid(write_grid(tmp_path, data_dir, {
      "model.num_layers": [1, 0], "seed": [0]}), "quick")
  cells = sweep.expand(grid)
  root = str(tmp_path / "cells")
  assert sweep.run(cells, root)
  failed = os.path.join(root, cells[1].name, sweep.FAILED)
  error = open(failed).read().strip()
  assert error == "ConfigError: model.num_layers=0 must be >= 1"
  stamp = os.stat(failed).st_mtime_ns
  assert sweep.run(cells, root)  # neither cell runs again
  assert os.stat(failed).st_mtime_ns == stamp
  records = [sweep.record(c, root, grid) for c in cells]
  assert [r["status"] for r in records] == ["done", "failed"]
  assert records[0]["keys_per_query"] == pytest.approx(33 / 2)
  out = str(tmp_path / "out")
  report.write_sweep(grid, records, cmd="python -m experiments.sweep ...",
                     preset="quick", out_dir=out)
  text = open(os.path.join(out, "RESULTS.md")).read()
  assert f"| {cells[1].name} | {error} |" in text
  assert "1 done, 1 failed, 0 not finished" in text
  assert "| 0 | - | - | - | - [1 failed] |" in text
  raw = json.load(open(os.path.join(out, "raw.json")))
  assert raw["cells"][1]["error"] == error
  assert os.path.exists(os.path.join(out, "tiny.png"))
  sweep.run(cells, root, retry_failed=True)
  assert os.stat(failed).st_mtime_ns != stamp


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_cells(tmp_path,
                                                               data_dir):
  axes = {"model.num_layers": [1], "seed": [0, 1]}
  grid_path = write_grid(tmp_path, data_dir, axes, steps=12,
                         checkpoint_every=2)
  first, second = [sweep.cell_name({"model.num_layers": 1, "seed": s})
                   for s in (0, 1)]
  out = tmp_path / "out"
  command = [sys.executable, "-m", "experiments.sweep", f"--grid={grid_path}",
             f"--out={out}"]
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  checkpoints = out / "cells" / second / "checkpoints"
  deadline = time.time() + 120
  while not (checkpoints.exists() and any(
      p.isdigit() for p in os.listdir(checkpoints))):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "cells" / second / sweep.DONE).exists()
  finished = out / "cells" / first / "metrics.jsonl"
  before = (finished.read_bytes(), os.stat(finished).st_mtime_ns)

  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "2 cells in this task: 1 done, 0 failed, 1 to run" in rerun.stderr
  assert "resumed from step" in rerun.stderr
  assert (finished.read_bytes(), os.stat(finished).st_mtime_ns) == before
  assert (out / "cells" / second / sweep.DONE).exists()
  results = (out / "RESULTS.md").read_text()
  assert f"--grid={grid_path}" in results and "2 done, 0 failed" in results
