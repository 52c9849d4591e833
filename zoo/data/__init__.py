"""Tasks (TFDS builders prepared locally) and grain pipelines; importing this
registers the tasks."""

from zoo.data import copying, listops, mqar, text, tfds_text  # noqa: F401
