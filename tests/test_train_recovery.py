"""Reliability of zoo/train.py and zoo/checkpoint.py: kill -9 and SIGTERM
mid-run, damaged checkpoints, non-finite losses, refused configs."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from tests.conftest import make_tiny_config
from zoo import checkpoint, metrics, train
from zoo.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every case trains (in a subprocess or more than once): the fast tier
# trains in tests/data/test_tfds_text.py.
pytestmark = pytest.mark.slow


def tiny_flags(data_dir, steps):
  return [
      f"--config.num_train_steps={steps}", "--config.batch_size=8",
      "--config.log_every_steps=5", "--config.eval_every_steps=1000",
      "--config.checkpoint_every_steps=5", "--config.warmup_steps=2",
      "--config.model.num_layers=1", "--config.model.embed_dim=32",
      "--config.model.mlp_dim=64", "--config.data.seq_len=32",
      "--config.data.task=mqar(num_pairs=4, vocab_size=32, num_train=512, "
      "num_eval=64)", f"--config.data.dir={data_dir}", "--config.mesh.data=1"]


def start(workdir, data_dir, steps):
  return subprocess.Popen(
      [sys.executable, "-m", "zoo.train", "--config=configs/default.py",
       f"--workdir={workdir}", *tiny_flags(data_dir, steps)],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def config_of(tiny_config, steps):
  tiny_config.num_train_steps = steps
  tiny_config.eval_every_steps = 1000
  return tiny_config


def params_of(config, workdir):
  from flax import nnx
  import jax
  model, _ = checkpoint.restore_model(config, workdir)
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def wait_for(predicate, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.002)
  return False


def steps_in(workdir):
  d = os.path.join(workdir, "checkpoints")
  return os.listdir(d) if os.path.isdir(d) else []


KILL_STEPS = 120


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """The workdir of an uninterrupted run of KILL_STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("whole"))
  train.train_and_evaluate(config_of(make_tiny_config(data_dir), KILL_STEPS),
                           workdir)
  return workdir


@pytest.mark.parametrize("moment", ["step", "checkpoint_write"])
def test_kill_9_then_resume_equals_uninterrupted(tiny_config, data_dir,
                                                 tmp_path, moment,
                                                 uninterrupted):
  steps = KILL_STEPS
  config = config_of(tiny_config, steps)
  whole = uninterrupted

  killed = str(tmp_path / "killed")
  proc = start(killed, data_dir, steps)
  if moment == "step":  # some step after the first checkpoint
    seen = wait_for(lambda: "10" in steps_in(killed), proc)
    time.sleep(np.random.default_rng().uniform(0, 0.2))
  else:
    seen = wait_for(lambda: any("tmp" in s for s in steps_in(killed)), proc)
  proc.kill()
  proc.wait()
  assert seen, "the run ended before it could be killed"
  train.train_and_evaluate(config, killed)

  rows, ref = metrics.read(killed), metrics.read(str(whole))
  assert [r["step"] for r in rows] == [r["step"] for r in ref]
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
  for a, b in zip(params_of(config, killed), params_of(config, str(whole))):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step_and_rerun_continues(tiny_config,
                                                            data_dir,
                                                            tmp_path):
  workdir = str(tmp_path / "run")
  proc = start(workdir, data_dir, 100000)
  assert wait_for(lambda: "5" in steps_in(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  saved = int(re.search(r"preempted: saved step (\d+)", out).group(1))
  assert str(saved) in steps_in(workdir)

  rerun = subprocess.run(
      [sys.executable, "-m", "zoo.train", "--config=configs/default.py",
       f"--workdir={workdir}", *tiny_flags(data_dir, saved + 5)],
      cwd=ROOT, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from step {saved}" in rerun.stderr
  assert metrics.read(workdir)[-1]["step"] == saved + 5


@pytest.fixture(scope="module")
def trained_20(data_dir, tmp_path_factory):
  """The workdir of a finished 20-step run, trained once per module."""
  workdir = str(tmp_path_factory.mktemp("twenty"))
  train.train_and_evaluate(config_of(make_tiny_config(data_dir), 20), workdir)
  return workdir


def _train_20(tiny_config, workdir, trained_20):
  """`workdir`: a copy of the finished 20-step run."""
  shutil.copytree(trained_20, workdir)
  return config_of(tiny_config, 20)


def test_damaged_newest_step_falls_back_to_the_previous(tiny_config,
                                                        tmp_path, caplog,
                                                        trained_20):
  workdir = str(tmp_path / "run")
  config = _train_20(tiny_config, workdir, trained_20)
  ckpts = os.path.join(workdir, "checkpoints")
  state_dir = os.path.join(ckpts, "20", "state")
  for name in os.listdir(state_dir):  # files gone from the newest step
    path = os.path.join(state_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  good = sorted(os.listdir(os.path.join(ckpts, "15")))

  config.num_train_steps = 25
  with caplog.at_level("INFO"):
    train.train_and_evaluate(config, workdir)
  assert "checkpoint step 20 is unreadable" in caplog.text
  assert "resumed from step 15" in caplog.text
  assert metrics.read(workdir)[-1]["step"] == 25
  assert [r["step"] for r in metrics.read(workdir)] == [5, 10, 15, 20, 25]
  assert sorted(os.listdir(os.path.join(ckpts, "15"))) == good
  assert os.path.isdir(os.path.join(workdir, "checkpoints_damaged", "20"))


def test_empty_newer_step_folder_falls_back(tiny_config, tmp_path, caplog,
                                            trained_20):
  workdir = str(tmp_path / "run")
  config = _train_20(tiny_config, workdir, trained_20)
  os.makedirs(os.path.join(workdir, "checkpoints", "30"))
  config.num_train_steps = 25
  with caplog.at_level("INFO"):
    train.train_and_evaluate(config, workdir)
  assert "checkpoint step 30 is unreadable" in caplog.text
  assert "resumed from step 20" in caplog.text
  assert metrics.read(workdir)[-1]["step"] == 25


class _NanAt(grain.DatasetIterator):
  """Batches pass through, except that batch `k` (1-based) gets NaN weights."""

  def __init__(self, it, k):
    super().__init__(it)
    self._it, self._k, self._n = it, k, 0

  def __next__(self):
    batch = next(self._it)
    self._n += 1
    if self._n == self._k:
      batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def test_nan_stops_with_the_step_and_keeps_the_last_checkpoint(
    tiny_config, tmp_path, monkeypatch):
  real = pipeline.train_iterator
  monkeypatch.setattr(pipeline, "train_iterator",
                      lambda *a, **k: _NanAt(real(*a, **k), 8))
  workdir = str(tmp_path / "run")
  config = config_of(tiny_config, 20)
  with pytest.raises(train.NonFiniteError, match="step 8: non-finite loss"):
    train.train_and_evaluate(config, workdir)
  assert steps_in(workdir) == ["5"]
  monkeypatch.setattr(pipeline, "train_iterator", real)
  assert checkpoint.restore_model(config, workdir)[1] == 5

  monkeypatch.setattr(pipeline, "train_iterator",
                      lambda *a, **k: _NanAt(real(*a, **k), 3))
  config.skip_nonfinite = True
  last = train.train_and_evaluate(config, str(tmp_path / "skip"))
  assert last["skipped_updates"] == 1 and np.isfinite(last["loss"])
