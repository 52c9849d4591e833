"""zoo: attention variants and positional encodings for Flax NNX, swappable
by name through one registry (`zoo.registry`)."""

from zoo import xla_flags as _xla_flags

# Before jax creates its backend, so every process that imports zoo (the
# trainer, a resumed run, the tests, a user's program) compiles the same.
_xla_flags.set_defaults()
