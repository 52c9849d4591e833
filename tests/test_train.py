"""The trainer end to end on tiny MQAR: loss falls, files appear, an
interrupted run resumes to the same result, bad configs exit 2."""

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from zoo import metrics, train
from zoo.data import pipeline


def test_short_run_learns_and_writes_its_files(tiny_config, tmp_path):
  tiny_config.num_train_steps = 60
  tiny_config.eval_every_steps = 60
  last = train.train_and_evaluate(tiny_config, str(tmp_path))
  rows = metrics.read(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(5, 61, 5))
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
  for key in ("loss", "accuracy", "learning_rate", "tokens_per_s",
              "tflops_per_s", "grad_norm"):
    assert np.isfinite(rows[-1][key])
  assert "eval_accuracy" in last and "eval_loss" in last
  assert json.load(open(tmp_path / "config.json"))["model"]["attention"] == (
      "standard")
  assert any(f.startswith("events") for f in os.listdir(tmp_path /
                                                        "tensorboard"))
  assert "60" in os.listdir(tmp_path / "checkpoints")


class _Crash(Exception):
  pass


class _CrashingIterator(grain.DatasetIterator):
  """Passes batches and state through, then dies on batch `limit` + 1."""

  def __init__(self, it, limit):
    super().__init__(it)
    self._it, self._left = it, limit

  def __next__(self):
    if self._left == 0:
      raise _Crash
    self._left -= 1
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def test_resume_after_interruption_matches_uninterrupted(tiny_config,
                                                         tmp_path,
                                                         monkeypatch):
  whole = train.train_and_evaluate(tiny_config, str(tmp_path / "whole"))
  real = pipeline.train_iterator
  # Dies fetching the batch of step 14; the newest checkpoint is step 10.
  monkeypatch.setattr(pipeline, "train_iterator",
                      lambda *a, **k: _CrashingIterator(real(*a, **k), 13))
  with pytest.raises(_Crash):
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
  monkeypatch.setattr(pipeline, "train_iterator", real)
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
  assert resumed["loss"] == whole["loss"]
  assert resumed["eval_loss"] == whole["eval_loss"]
  rows = metrics.read(str(tmp_path / "resumed"))
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert [r["loss"] for r in rows] == [
      r["loss"] for r in metrics.read(str(tmp_path / "whole"))]


def _cli(workdir, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "zoo.train", "--config=configs/default.py",
       f"--workdir={workdir}", *overrides],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)


@pytest.mark.parametrize("override,message", [
    ("--config.model.attention=no_such", "model.attention: unknown attention"),
    ("--config.model.position=rope9", "model.position: unknown position"),
    ("--config.data.task=mqar(pairs=3)", "data.task: task 'mqar' has no "
     "argument 'pairs'"),
    ("--config.model.num_heads=3", "embed_dim=64 must be divisible"),
    ("--config.mesh.data=3", "mesh"),
    ("--config.model.dtype=float8", "model.dtype='float8'; valid: float32"),
    ("--config.no_such_key=1", "no config key 'no_such_key'"),
    ("--config.model.position=learned(max_len=8)", "learned(max_len=8) is "
     "shorter than the sequence length 64"),
    ("--config.data.task=text(path='/no/such/file.txt')", "data.task: task "
     "text(path='/no/such/file.txt'): no file matches"),
    ("--config.model.num_kv_heads=3", "num_heads=4 must be divisible by "
     "model.num_kv_heads=3"),
    ("--config.batch_size=0", "batch_size=0 must be >= 1"),
    ("--config.model.attention=local(window=0)", "model.attention: attention "
     "local(window=...) must be"),
    ("--config.model.attention=blockwise(block_q=0)", "model.attention: "
     "attention blockwise(block_q=...) must be >= 1"),
    ("--config.model.position=alibi --config.model.attention=linear",
     "attention 'linear' cannot take position 'alibi'"),
])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, override, message):
  workdir = tmp_path / "run"
  result = _cli(workdir, *override.split())
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert not workdir.exists()


def test_workdir_of_another_model_is_refused(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  tiny_config.num_train_steps = 5
  train.train_and_evaluate(tiny_config, str(workdir))
  before = sorted(os.listdir(workdir / "checkpoints"))
  tiny_config.model.mlp_dim = 48
  with pytest.raises(train.ConfigError, match=r"parameter trunk/blocks/0/"
                     r"mlp/down/kernel of shape \(64, 32\), this config makes "
                     r"\(48, 32\)"):
    train.train_and_evaluate(tiny_config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before
