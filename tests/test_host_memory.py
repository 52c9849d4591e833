"""zoo.host_memory: after `retain()`, a block larger than a glibc thread
arena, malloc'd and freed on a worker thread (as XLA:CPU does with an
execution's temporaries), is reused instead of faulted in afresh on every
call. Counted in a fresh process each way, with malloc called directly:
XLA's own frees run asynchronously, so how many blocks a program holds at
once depends on load (the benchmarks report XLA's page faults per step)."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Page faults of each of 5 malloc / touch / free rounds of 100 MB.
PROGRAM = """
import ctypes, ctypes.util, resource, sys, threading
from zoo import host_memory
if sys.argv[1] == "retain":
  assert host_memory.retain() is None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size, faults = 100 << 20, []

def rounds():
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print("FAULTS", *faults)
"""


def faults(mode: str) -> list[int]:
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-4000:]
  return [int(x) for x in out.stdout.split("FAULTS")[-1].split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
  kept, default = faults("retain"), faults("default")
  assert max(kept[1:]) < 100, kept  # 100 MB is 25.6k pages of 4 KiB
  assert min(default) > 10 * max(max(kept[1:]), 1), default
