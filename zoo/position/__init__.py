"""Positional encodings; importing this registers them all."""

from zoo.position import absolute, relative, rotary  # noqa: F401
from zoo.position.base import Position  # noqa: F401
