"""Shared by the benchmarks: wall time as the median of runs after a
warm-up, and a compiled program's peak memory from XLA's buffer
assignment."""

import time

import jax
import numpy as np


def seconds(fn, args, repeats: int) -> list[float]:
  """Wall times of `repeats` runs of `fn(*args)` after one warm-up run,
  each waited for (jax.block_until_ready)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def median_seconds(fn, args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` runs after a warm-up."""
  return float(np.median(seconds(fn, args, repeats)))


def peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries of a compiled program, less what the
  outputs alias (donated inputs)."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)
