"""Host memory policy for XLA:CPU programs: keep freed memory for reuse.

XLA:CPU takes an execution's temporary buffers from malloc on its worker
threads. glibc serves those threads from arenas of at most 64 MB, so a
larger block is mmapped and unmapped on every call, and every step faults
its pages in afresh, zeroing them again (figures:
experiments/results/step_throughput/RESULTS.md). `retain()` sets glibc to one arena, no mmapped
blocks and no trimming, so every call reuses the pages the last one
freed. The cost: the process keeps its peak heap, and threads share one
arena (small blocks still come from per-thread caches).

The trainer and the benchmark programs call it first thing in `main`;
a user's program may too. It must run before jax starts its CPU backend
(the first computation): threads that have allocated keep their arenas.
"""

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain() -> str | None:
  """Sets the policy; None when set, else one line saying why not (a C
  library other than glibc)."""
  name = ctypes.util.find_library("c")
  libc = ctypes.CDLL(name) if name else None
  if libc is None or not hasattr(libc, "gnu_get_libc_version"):
    return "host memory policy not set: the C library is not glibc"
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
              (_M_TRIM_THRESHOLD, 2**31 - 1))
  if not all(libc.mallopt(option, value) == 1 for option, value in settings):
    return "host memory policy not set: glibc's mallopt refused it"
  return None
