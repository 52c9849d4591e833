"""XLA options every process that imports zoo runs with (set by
`zoo/__init__.py`): the trainer, a resumed run, the sweep harness, the
benchmarks and the tests compile the same programs, so a run resumed in
another process stays bit-exact.

XLA:CPU in jax 0.10.2 hands reductions to YNNPACK fusions, which ran the
linear-time attention ops 1.2-1.6x slower at length 8192 than XLA's own
loops (causal forward+backward, batch 1, 4 heads: elu linear 0.150 ->
0.106 s, local 0.225 -> 0.177 s, BigBird 0.445 -> 0.279 s, sparse 0.246 ->
0.199 s), so that fusion type is turned off; dot fusions stay on. The LM
train step at length 512 did not change measurably. Other platforms ignore
the option. XLA reads XLA_FLAGS when jax creates its first backend: import
zoo before any jax computation (or set the flag yourself); a flag already in
XLA_FLAGS is left as the user set it.
"""

import os

DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "-reduce"}


def set_defaults():
  """Adds each default the user has not set to XLA_FLAGS."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in DEFAULTS.items()
           if f"--{name}=" not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
