"""grain pipelines. Every process shuffles the same global order (one seed)
and takes every `process_count`-th element from its own offset, so a global
batch holds the same examples whatever the number of processes (only their
row order differs). The training iterator's state (`get_state`/`set_state`)
is saved with each checkpoint."""

import grain
import jax
import numpy as np


def _local_batch(global_batch: int) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise ValueError(f"batch_size={global_batch} must be divisible by the "
                     f"{count} processes")
  return global_batch // count


def _this_process(ds):
  return ds[jax.process_index()::jax.process_count()]


def train_iterator(source, *, global_batch: int, seed: int):
  """Endless shuffled batches of this process's share (reshuffled each
  epoch); a checkpointable grain DatasetIterator."""
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = _this_process(ds).batch(_local_batch(global_batch), drop_remainder=True)
  return iter(ds.to_iter_dataset())


def eval_batches(source, *, global_batch: int):
  """One pass over every example, this process's share, in full batches.
  The last global batch is filled up with copies of example 0 whose
  `weights` are zero (an example without `weights` gets a per-example 1 or
  0), so every process runs the same steps and each example counts once
  in a weighted mean."""
  n = len(source)
  if n == 0:
    raise ValueError("the eval split is empty")

  def example(i):
    record = dict(source[min(i, n - 1) if i < n else 0])
    real = i < n
    if "weights" in record:
      record["weights"] = record["weights"] * np.float32(real)
    else:
      record["weights"] = np.float32(real)
    return record

  padded = -(-n // global_batch) * global_batch
  ds = _this_process(grain.MapDataset.range(padded).map(example))
  return ds.batch(_local_batch(global_batch))
