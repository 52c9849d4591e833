"""Any text dataset TFDS knows (lm1b, wiki40b, ...) as byte-level language
modelling: each example's text feature, UTF-8 encoded, becomes one window of
seq_len + 1 bytes (truncated, or padded with weight 0). The dataset must be
prepared in data.dir already, or `download=True` where there is a network.
For one long document (tiny_shakespeare), use `text(path=...)` on the file,
which cuts it into many windows."""

import numpy as np
import tensorflow_datasets as tfds

from zoo import registry


def byte_window(text, seq_len: int) -> dict[str, np.ndarray]:
  """inputs/targets/weights of one example, from str or bytes."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  data = np.frombuffer(data[:seq_len + 1], np.uint8).astype(np.int32)
  window = np.zeros(seq_len + 1, np.int32)
  window[:len(data)] = data
  weights = np.zeros(seq_len, np.float32)
  weights[:max(len(data) - 1, 0)] = 1.0
  return {"inputs": window[:-1], "targets": window[1:], "weights": weights}


class _Windows:
  """Random-access view of a TFDS data source as byte windows."""

  def __init__(self, source, feature: str, seq_len: int):
    self.source, self.feature, self.seq_len = source, feature, seq_len

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return byte_window(self.source[index][self.feature], self.seq_len)


@registry.register("task", "tfds_text")
class TfdsText:
  """Byte-level LM on a TFDS text dataset by name (vocabulary 256)."""

  model = "lm"

  def __init__(self, name: str = "lm1b", feature: str = "text",
               train_split: str = "train", eval_split: str = "test",
               download: bool = False, *, seq_len: int):
    self.name, self.feature, self.download = name, feature, download
    self.splits = {"train": train_split, "eval": eval_split}
    self.seq_len = seq_len
    self.model_args = {"vocab_size": 256}

  def sources(self, data_dir: str | None):
    out = {}
    for ours, theirs in self.splits.items():
      try:
        source = tfds.data_source(self.name, split=theirs, data_dir=data_dir,
                                  download=self.download)
      except Exception as e:  # noqa: BLE001 - TFDS raises many kinds
        raise ValueError(
            f"task tfds_text(name={self.name!r}): cannot open split "
            f"{theirs!r} in data.dir={data_dir!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); prepare it there first, or "
            "pass download=True where there is a network") from None
      out[ours] = _Windows(source, self.feature, self.seq_len)
    return out
