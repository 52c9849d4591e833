"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology").

A sequence starts with N key-value pairs `k1 v1 k2 v2 ...`; then, in a region
of filler tokens (0), each key appears once more as a query at a random even
offset, and the model must predict the value that followed it. Keys come from
[1, V/2), values from [V/2, V); the loss counts only the answer positions.
Generated locally as a TFDS builder (array_record, no TensorFlow).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from zoo import registry
from zoo.data.source import GeneratedBuilder, lm_features, prepare_and_load


def mqar_example(rng: np.random.Generator, seq_len: int, num_pairs: int,
                 vocab_size: int) -> dict[str, np.ndarray]:
  """One example: inputs, targets (next token, the value at answers) and
  weights (1 at the N answer positions), each of length `seq_len`."""
  n = num_pairs
  keys = rng.choice(np.arange(1, vocab_size // 2), n, replace=False)
  values = rng.choice(np.arange(vocab_size // 2, vocab_size), n,
                      replace=False)
  tokens = np.zeros(seq_len + 1, np.int32)
  tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
  slots = (seq_len + 1 - 2 * n) // 2
  query_pos = 2 * n + 2 * rng.choice(slots, n, replace=False)
  order = rng.permutation(n)
  tokens[query_pos] = keys[order]
  targets = tokens[1:].copy()
  targets[query_pos] = values[order]
  weights = np.zeros(seq_len, np.float32)
  weights[query_pos] = 1.0
  return {"inputs": tokens[:-1], "targets": targets, "weights": weights}


@dataclasses.dataclass
class MqarConfig(tfds.core.BuilderConfig):
  seq_len: int = 64
  num_pairs: int = 8
  vocab_size: int = 128
  num_train: int = 20000
  num_eval: int = 1000
  seed: int = 0


class MqarBuilder(GeneratedBuilder):
  """TFDS builder; one config per (length, pairs, vocabulary, sizes, seed)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First version.",
                   "1.1.0": "A validation split."}
  name = "zoo_mqar"

  def _info(self):
    return self.dataset_info_from_configs(
        features=lm_features(self.builder_config.seq_len))

  def example(self, rng, split):
    del split  # every split is drawn alike
    c = self.builder_config
    return mqar_example(rng, c.seq_len, c.num_pairs, c.vocab_size)


@registry.register("task", "mqar")
class Mqar:
  """Multi-query associative recall for the decoder LM; `seq_len` comes from
  data.seq_len. Metrics: accuracy on the answer positions (chance is
  2 / vocab_size)."""

  model = "lm"

  def __init__(self, num_pairs: int = 8, vocab_size: int = 128,
               num_train: int = 20000, num_eval: int = 1000, seed: int = 0, *,
               seq_len: int):
    if num_pairs < 1 or 4 * num_pairs > seq_len + 1:
      raise ValueError(
          f"task mqar(num_pairs={num_pairs}) needs 1 <= num_pairs <= "
          f"(data.seq_len + 1) / 4 = {(seq_len + 1) // 4}")
    if vocab_size // 2 - 1 < num_pairs:
      raise ValueError(
          f"task mqar(vocab_size={vocab_size}) needs vocab_size >= "
          f"{2 * num_pairs + 2} for {num_pairs} distinct keys")
    if num_train < 1 or num_eval < 1:
      raise ValueError("task mqar: num_train and num_eval must be >= 1")
    self.config = MqarConfig(
        name=f"t{seq_len}_n{num_pairs}_v{vocab_size}_{num_train}_"
        f"{num_eval}_s{seed}", seq_len=seq_len, num_pairs=num_pairs,
        vocab_size=vocab_size, num_train=num_train, num_eval=num_eval,
        seed=seed)
    self.model_args = {"vocab_size": vocab_size}

  def sources(self, data_dir: str | None):
    """Random-access sources, prepared once: train, eval (the validation
    split: curves, model choice) and test (the reported metric)."""
    return prepare_and_load(MqarBuilder, self.config, data_dir,
                            {"train": "train", "eval": "validation",
                             "test": "test"})
