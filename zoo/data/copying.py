"""Copying with length generalisation (Jelassi et al. 2024, "Repeat After
Me"): a string of symbols, a separator, then the string again; the loss
counts only the copy. Training strings have 1..`max_len` symbols; the
test splits hold strings of about 1x, 1.5x and 2x `max_len`, so one run
reports copying in and beyond the lengths it trained on.

Tokens: 0 pad, 1 separator, 2..V-1 the symbols (V = `vocab_size`, at
least 18: 16 symbols or more). A sequence is `s SEP s` padded to
data.seq_len + 1, which must hold the longest test string: 2 x (2 x
max_len) + 1 tokens. Generated locally as a TFDS builder (array_record, no
TensorFlow).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from zoo import registry
from zoo.data.source import GeneratedBuilder, lm_features, prepare_and_load

SEP = 1
# Test splits beyond the training lengths: name -> string lengths drawn
# from (scale - 0.25, scale] x max_len.
SCALES = {"test": 1.0, "test_x15": 1.5, "test_x2": 2.0}


def copy_example(rng: np.random.Generator, seq_len: int, vocab_size: int,
                 low: int, high: int) -> dict[str, np.ndarray]:
  """A string of low..high symbols and its copy: inputs, targets (the next
  token) and weights (1 where the target is a copied symbol), each of
  length `seq_len`."""
  n = int(rng.integers(low, high + 1))
  symbols = rng.integers(2, vocab_size, n).astype(np.int32)
  tokens = np.zeros(seq_len + 1, np.int32)
  tokens[:n], tokens[n], tokens[n + 1:2 * n + 1] = symbols, SEP, symbols
  weights = np.zeros(seq_len, np.float32)
  weights[n:2 * n] = 1.0  # inputs at SEP .. s_{n-1} predict s_1 .. s_n
  return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights}


@dataclasses.dataclass
class CopyConfig(tfds.core.BuilderConfig):
  seq_len: int = 130
  max_len: int = 32
  vocab_size: int = 32
  num_train: int = 20000
  num_eval: int = 1000
  seed: int = 0


class CopyBuilder(GeneratedBuilder):
  """TFDS builder; train and validation strings up to max_len, a test
  split per scale in SCALES."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  SPLITS = {**GeneratedBuilder.SPLITS, "test_x15": 3, "test_x2": 4}
  name = "zoo_copy"

  def _info(self):
    return self.dataset_info_from_configs(
        features=lm_features(self.builder_config.seq_len))

  def example(self, rng, split):
    c = self.builder_config
    if split in SCALES:
      high = int(SCALES[split] * c.max_len)
      low = max(1, int((SCALES[split] - 0.25) * c.max_len) + 1)
    else:
      low, high = 1, c.max_len
    return copy_example(rng, c.seq_len, c.vocab_size, low, high)


@registry.register("task", "copy")
class Copy:
  """Copy a string after a separator; train on up to `max_len` symbols,
  test at about 1x, 1.5x and 2x (`test_*`, `test_x15_*`, `test_x2_*`
  metrics). data.seq_len must hold 4 x max_len + 1 tokens. Chance per
  symbol: 1 / (vocab_size - 2)."""

  model = "lm"

  def __init__(self, max_len: int = 32, vocab_size: int = 32,
               num_train: int = 20000, num_eval: int = 1000, seed: int = 0,
               *, seq_len: int):
    if max_len < 1 or 4 * max_len + 1 > seq_len + 1:
      raise ValueError(
          f"task copy(max_len={max_len}) needs 1 <= max_len and data.seq_len "
          f">= 4 x max_len = {4 * max_len} (the 2x test strings and their "
          f"copies); got data.seq_len={seq_len}")
    if vocab_size < 18:
      raise ValueError(f"task copy(vocab_size={vocab_size}) must be >= 18 "
                       "(16 symbols, pad and separator)")
    if num_train < 1 or num_eval < 1:
      raise ValueError("task copy: num_train and num_eval must be >= 1")
    self.config = CopyConfig(
        name=f"t{seq_len}_m{max_len}_v{vocab_size}_{num_train}_{num_eval}_"
        f"s{seed}", seq_len=seq_len, max_len=max_len, vocab_size=vocab_size,
        num_train=num_train, num_eval=num_eval, seed=seed)
    self.model_args = {"vocab_size": vocab_size}

  def sources(self, data_dir: str | None):
    """train, eval (validation: in-distribution lengths) and the test
    splits (1x, 1.5x, 2x max_len)."""
    return prepare_and_load(CopyBuilder, self.config, data_dir,
                            {"train": "train", "eval": "validation",
                             **{name: name for name in SCALES}})
