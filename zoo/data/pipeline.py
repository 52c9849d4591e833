"""grain pipelines: each process reads its own shard, shuffled with a seed,
batched to its slice of the global batch. The training iterator's state
(`get_state`/`set_state`) is saved with each checkpoint."""

import grain
import jax


def _local_batch(global_batch: int) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise ValueError(f"batch_size={global_batch} must be divisible by the "
                     f"{count} processes")
  return global_batch // count


def train_iterator(source, *, global_batch: int, seed: int):
  """Endless shuffled batches of this process's shard (reshuffled each
  epoch); a checkpointable grain DatasetIterator."""
  ds = grain.MapDataset.source(source)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.seed(seed).shuffle().repeat(None)
  ds = ds.batch(_local_batch(global_batch), drop_remainder=True)
  return iter(ds.to_iter_dataset())


def eval_batches(source, *, global_batch: int):
  """One pass over this process's shard in full batches (a remainder smaller
  than a batch is left out, so every process runs the same steps)."""
  ds = grain.MapDataset.source(source)
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(_local_batch(global_batch), drop_remainder=True)
