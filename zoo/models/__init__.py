"""Models built from registry specs; importing this registers them."""

from zoo.models import transformer  # noqa: F401
