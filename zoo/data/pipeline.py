"""grain pipelines. Every process shuffles the same global order (one seed)
and takes every `process_count`-th element from its own offset, so a global
batch holds the same examples whatever the number of processes (only their
row order differs). The training iterator's state (`get_state`/`set_state`)
is saved with each checkpoint."""

import grain
import jax


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
  """One pass over this process's share in full batches (a remainder smaller
  than a batch is left out, so every process runs the same steps)."""
  ds = _this_process(grain.MapDataset.source(source))
  return ds.batch(_local_batch(global_batch), drop_remainder=True)
