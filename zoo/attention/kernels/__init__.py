"""Attention kernels: Pallas splash/flash for accelerators, C++ for CPU."""

from zoo.attention.kernels import splash  # noqa: F401
