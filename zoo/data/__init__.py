"""Tasks (TFDS builders prepared locally) and grain pipelines; importing this
registers the tasks."""

from zoo.data import mqar, text  # noqa: F401
