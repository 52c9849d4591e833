"""Smoothed n-gram baselines for byte-level text: what a count model gets
on the same split, the bar a language model must clear before its
attention family means anything.

Interpolated Kneser-Ney (Chen & Goodman 1998, with one discount D = 0.75
per order): the highest order uses counts, the lower orders continuation
counts (how many distinct bytes precede a context and byte), and the
lowest interpolates with the uniform distribution over the 256 bytes, so
no byte gets probability 0. Trained on the train split's bytes; scored on
the eval split's windows as the model is, each target predicted from the
bytes before it in its own window (fewer than n - 1 at a window's start).

  python -m experiments.ngram --path=../shared/data/tinyshakespeare.txt
"""

import collections
import math

import numpy as np
from absl import app, flags

from zoo.data import text

DISCOUNT = 0.75
VOCAB = 256


class KneserNey:
  """An interpolated Kneser-Ney byte model of order `n`."""

  def __init__(self, data: bytes, n: int):
    self.n = n
    top = n - 1
    # counts[k][gram] for grams of k + 1 bytes: occurrences at the top
    # order, distinct preceding bytes below it.
    self.counts = []
    for k in range(n):
      if k == top:
        grams = collections.Counter(data[i - k:i + 1]
                                    for i in range(k, len(data)))
      else:
        grams = collections.Counter(
            pair[1:] for pair in {data[i - k - 1:i + 1]
                                  for i in range(k + 1, len(data))})
      self.counts.append(grams)
    self.totals = [collections.Counter() for _ in range(n)]
    self.followers = [collections.Counter() for _ in range(n)]
    for k in range(n):
      for gram, count in self.counts[k].items():
        self.totals[k][gram[:-1]] += count
        self.followers[k][gram[:-1]] += 1

  def probability(self, context: bytes, byte: int) -> float:
    """P(byte | the last n - 1 bytes of `context`)."""
    p = 1.0 / VOCAB
    for k in range(min(self.n - 1, len(context)) + 1):
      history = context[len(context) - k:]
      total = self.totals[k].get(history, 0)
      if not total:
        break
      count = self.counts[k].get(history + bytes([byte]), 0)
      p = (max(count - DISCOUNT, 0.0) + DISCOUNT
           * self.followers[k][history] * p) / total
    return p


def bits_per_byte(model: KneserNey, windows: np.ndarray) -> float:
  """Mean -log2 P of each window's targets (bytes 1..L) given the bytes
  before them in the window."""
  total, count = 0.0, 0
  for window in windows:
    row = bytes(window.astype(np.uint8).tolist())
    for i in range(1, len(row)):
      total -= math.log2(model.probability(row[:i], row[i]))
      count += 1
  return total / count


def baselines(path: str, seq_len: int, eval_fraction: float = 0.1,
              orders=(2, 3, 4), max_windows: int | None = None
              ) -> dict[str, float]:
  """{"2-gram": bits per byte, ...} on the split `text(path=...,
  eval_fraction=...)` makes at `seq_len` (up to `max_windows` eval windows,
  all by default)."""
  data, _ = text.read_bytes(path)
  cut = int(len(data) * (1 - eval_fraction))
  windows = text.windows(np.frombuffer(data[cut:], np.uint8), seq_len + 1)
  windows = windows[:max_windows]
  return {f"{n}-gram (Kneser-Ney)": bits_per_byte(KneserNey(data[:cut], n),
                                                  windows)
          for n in orders}


def main(argv):
  del argv
  f = flags.FLAGS
  for name, bits in baselines(f.path, f.seq_len, f.eval_fraction).items():
    print(f"{name}: {bits:.4f} bits per byte")


if __name__ == "__main__":
  flags.DEFINE_string("path", None, "Text file (path or glob).",
                      required=True)
  flags.DEFINE_integer("seq_len", 128, "Window length of the eval split.")
  flags.DEFINE_float("eval_fraction", 0.1, "Share of bytes evaluated.")
  app.run(main)
