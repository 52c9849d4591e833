"""Two processes on 127.0.0.1 (4 fake CPU devices each) never wait forever:
a long evaluation finishes, a first run prepares its data once, SIGTERM saves
a step both agree on, and a killed or failing process ends the other."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.test_sharding import ROOT, _free_port
from zoo import metrics

pytestmark = pytest.mark.slow  # two processes training, each case

TIMEOUT_S = 10  # config.peer_timeout_s of these runs
# 8 examples per process and batch: 1100 eval examples are >= 60 batches.
TASK = "mqar(num_pairs=4, vocab_size=32, num_train=512, num_eval=1100)"


def _flags(data_dir, **overrides):
  config = {"num_train_steps": 100000, "batch_size": 16, "warmup_steps": 1,
            "log_every_steps": 5, "eval_every_steps": 100000,
            "checkpoint_every_steps": 100000, "peer_timeout_s": TIMEOUT_S,
            "model.num_layers": 1, "model.embed_dim": 32,
            "model.mlp_dim": 64, "data.seq_len": 32, "data.task": TASK,
            "data.dir": data_dir, "mesh.data": -1, **overrides}
  return [f"--config.{k}={v}" for k, v in config.items()]


class _Pair:
  """Processes 0 and 1 of one run, their output in files of `tmp`."""

  def __init__(self, tmp, flags_of):
    """`flags_of(i)`: the config flags of process i."""
    port = _free_port()
    env = dict(os.environ,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    self.workdir = str(tmp / "run")
    self.logs = [str(tmp / f"p{i}.log") for i in range(2)]
    self.procs = []
    for i in range(2):
      with open(self.logs[i], "w") as out:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "zoo.train", "--config=configs/default.py",
             f"--workdir={self.workdir}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}", *flags_of(i)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))

  def output(self, i) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def wait_for(self, text, timeout=240):
    """Waits until process 0 prints `text`."""
    deadline = time.time() + timeout
    while text not in self.output(0):
      assert time.time() < deadline and all(
          p.poll() is None for p in self.procs), self.output(0)[-3000:]
      time.sleep(0.05)

  def finish(self, timeout) -> list[int]:
    """Exit codes; fails if a process is still running after `timeout` s."""
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(deadline - time.time(), 0.1))
              for p in self.procs]
    except subprocess.TimeoutExpired:
      for p in self.procs:
        p.kill()
      raise AssertionError(f"still running after {timeout} s:\n" +
                           "\n".join(self.output(i)[-2000:] for i in (0, 1)))


def _saved_step(out: str) -> int:
  return int(re.search(r"preempted: saved step (\d+)", out).group(1))


def test_first_run_evaluates_60_batches_and_sigterm_in_eval_saves(tmp_path):
  """On an empty data dir process 0 prepares the data while process 1 waits;
  64 eval batches per process finish; SIGTERM during that evaluation saves
  the step both agree on, and both exit 0."""
  pair = _Pair(tmp_path, lambda i: _flags(
      str(tmp_path / "tfds"), log_every_steps=1, eval_every_steps=2))
  pair.wait_for("step 1/")
  time.sleep(0.3)  # step 2 is quick; its evaluation takes seconds
  for p in pair.procs:
    p.send_signal(signal.SIGTERM)
  assert pair.finish(TIMEOUT_S + 30) == [0, 0], pair.output(0)[-3000:]
  saved = _saved_step(pair.output(0))
  assert saved == _saved_step(pair.output(1)) and saved in (2, 3)
  assert os.listdir(os.path.join(pair.workdir, "checkpoints")) == [str(saved)]
  row = {r["step"]: r for r in metrics.read(pair.workdir)}[2]
  assert "eval_loss" in row and row["eval_time_s"] > 0


def test_sigterm_to_one_process_in_training_saves_the_same_step(tmp_path):
  pair = _Pair(tmp_path, lambda i: _flags(str(tmp_path / "tfds")))
  pair.wait_for("step 10/")
  pair.procs[1].send_signal(signal.SIGTERM)
  assert pair.finish(TIMEOUT_S + 30) == [0, 0], pair.output(0)[-3000:]
  saved = _saved_step(pair.output(0))
  assert saved == _saved_step(pair.output(1)) and saved > 10
  assert os.listdir(os.path.join(pair.workdir, "checkpoints")) == [str(saved)]


def test_kill_9_of_one_process_ends_the_other(tmp_path):
  pair = _Pair(tmp_path, lambda i: _flags(str(tmp_path / "tfds")))
  pair.wait_for("step 10/")
  pair.procs[1].kill()
  began = time.time()
  assert pair.finish(TIMEOUT_S + 30)[0] == 1
  assert time.time() - began < TIMEOUT_S + 10
  assert "lost process 1: no heartbeat" in pair.output(0)


def test_failure_in_one_process_ends_the_other(tmp_path):
  """data.dir must be shared by all processes; process 1's is another,
  empty one, so it cannot read what process 0 prepared and fails."""
  pair = _Pair(tmp_path, lambda i: _flags(str(tmp_path / f"tfds{i}")))
  assert pair.finish(120) == [1, 1], pair.output(0)[-3000:]
  assert "process 1 failed: KeyError" in pair.output(0)


def test_sigterm_while_process_0_prepares_data_ends_both_in_time(tmp_path):
  """SIGTERM on a first run while process 0 prepares a large dataset and
  process 1 waits for it: no step can be saved, so both exit 1 once
  peer_timeout_s has passed."""
  task = "mqar(num_pairs=4, vocab_size=32, num_train=1000000, num_eval=64)"
  pair = _Pair(tmp_path, lambda i: _flags(str(tmp_path / "tfds"),
                                          **{"data.task": task}))
  pair.wait_for("Generating train examples")
  for p in pair.procs:
    p.send_signal(signal.SIGTERM)
  began = time.time()
  assert pair.finish(TIMEOUT_S + 30) == [1, 1], pair.output(1)[-3000:]
  assert time.time() - began < TIMEOUT_S + 10
  for i in (0, 1):
    assert "SIGTERM: no checkpoint saved within" in pair.output(i)
