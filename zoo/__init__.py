"""zoo: attention variants and positional encodings for Flax NNX, swappable
by name through one registry (`zoo.registry`)."""
