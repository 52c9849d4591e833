"""XLA options the trainer, the sweep harness, the benchmarks and the tests
run with, so that they compile the same programs (a run resumed in another
process stays bit-exact) and the benchmarks time what the trainer runs.

XLA:CPU in jax 0.10 hands reductions to YNNPACK fusions, which run the
linear-time attention ops (linear, local, sparse, BigBird) slower at long
lengths than XLA's own loops, so that fusion type is turned off; dot
fusions stay on. Other platforms ignore the option. Measurements:
experiments/results/attention_cost/RESULTS.md, "XLA:CPU flags".

Importing zoo changes no flags. XLA reads XLA_FLAGS once, when jax creates
its first backend: call `apply()` before the first jax computation (the
mains here call it first thing), or set the flags yourself.
"""

import os

DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "-reduce"}


def apply():
  """Adds each default the user has not set to XLA_FLAGS; a flag already
  there is left as the user set it."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in DEFAULTS.items()
           if f"--{name}=" not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
