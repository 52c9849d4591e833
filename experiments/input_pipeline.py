"""Is the input pipeline ever the bottleneck? Batches/s of the grain
pipeline alone against steps/s of training, for a config (default:
configs/default.py). Writes experiments/results/input_pipeline/.

  python -m experiments.input_pipeline
"""

import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import report
from zoo import metrics, registry, train, xla_flags
from zoo.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                          "Training config.")
_BATCHES = flags.DEFINE_integer("batches", 2000, "Batches read when timing "
                                "the pipeline alone.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps timed.")


def pipeline_rate(config) -> float:
  task = registry.build("task", config.data.task, seq_len=config.data.seq_len)
  source = task.sources(config.data.dir or None)["train"]
  it = pipeline.train_iterator(source, global_batch=config.batch_size,
                               seed=config.seed)
  next(it)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  return _BATCHES.value / (time.perf_counter() - start)


def training_rate(config) -> float:
  config.num_train_steps = _STEPS.value
  config.log_every_steps = 50
  config.eval_every_steps = 10**9
  config.checkpoint_every_steps = 10**9
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    rows = metrics.read(workdir)[1:]  # the first window holds compilation
  tokens = np.median([r["tokens_per_s"] for r in rows])
  return float(tokens / (config.batch_size * config.data.seq_len))


def main(argv):
  del argv
  xla_flags.apply()  # before jax starts: compile as the trainer does
  config = _CONFIG.value
  batches_per_s = pipeline_rate(config)
  steps_per_s = training_rate(config)
  body = report.markdown_table(
      ["task", "batch", "pipeline batches/s", "training steps/s", "ratio"],
      [[config.data.task, config.batch_size, batches_per_s, steps_per_s,
        batches_per_s / steps_per_s]])
  report.write("input_pipeline", "Input pipeline against training speed",
               body + "\n\nThe pipeline alone reads one process's batches "
               "(grain, single-threaded); training steps/s is the median of "
               "the logged windows after the first.",
               {"batches_per_s": batches_per_s, "steps_per_s": steps_per_s,
                "task": config.data.task, "batch_size": config.batch_size})


if __name__ == "__main__":
  app.run(main)
