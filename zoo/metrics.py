"""Where metrics go: DIR/metrics.jsonl (one JSON object per logged step) and
DIR/tensorboard/ (tensorboardX events), written by process 0 only."""

import json
import os

import jax
import tensorboardX


class MetricsWriter:
  """Appends {"step": ..., **scalars} rows; on resume, rows past the restored
  step (written before a crash) are dropped so the file reads as one run."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      with open(self.path, "w") as f:
        for row in rows:
          if row["step"] <= resume_step:
            f.write(json.dumps(row) + "\n")
    self.tensorboard = tensorboardX.SummaryWriter(
        os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in scalars.items():
      self.tensorboard.add_scalar(key, float(value), int(step))
    self.tensorboard.flush()

  def close(self):
    if self.enabled:
      self.tensorboard.close()


def read(workdir: str) -> list[dict]:
  """The rows of DIR/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
