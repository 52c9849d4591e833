"""Byte-level language modelling on local text files (vocabulary 256, no
tokenizer). Files matching `path` (a path or glob) are concatenated in sorted
order; the first `1 - eval_fraction` of the bytes train, the rest evaluate,
cut into non-overlapping windows of seq_len + 1 bytes. Metrics in bits per
byte (`bits_per_token`)."""

import dataclasses
import glob
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from zoo import registry
from zoo.data.source import lm_features, prepare_and_load


def read_bytes(path: str) -> tuple[bytes, list[str]]:
  """The concatenated bytes of the files matching `path`, and the files."""
  files = sorted(glob.glob(os.path.expanduser(path)))
  if not path or not files:
    raise ValueError(f"task text(path={path!r}): no file matches; give a "
                     "text file path or glob")
  data = b"".join(open(f, "rb").read() for f in files)
  if not data:
    raise ValueError(f"task text(path={path!r}): the files are empty")
  return data, files


def windows(data: np.ndarray, length: int) -> np.ndarray:
  """Non-overlapping windows Nx`length` of a byte array (tail dropped)."""
  n = len(data) // length
  return data[:n * length].reshape(n, length)


@dataclasses.dataclass
class TextConfig(tfds.core.BuilderConfig):
  path: str = ""
  seq_len: int = 256
  eval_fraction: float = 0.1


class TextBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over local files; the config name carries a hash of their
  content, so edited files are prepared afresh."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  name = "zoo_text"

  def _info(self):
    return self.dataset_info_from_configs(
        features=lm_features(self.builder_config.seq_len))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    data = np.frombuffer(read_bytes(c.path)[0], np.uint8).astype(np.int32)
    cut = int(len(data) * (1 - c.eval_fraction))
    return {"train": self._generate_examples(data[:cut]),
            "validation": self._generate_examples(data[cut:])}

  def _generate_examples(self, data):
    for i, w in enumerate(windows(data, self.builder_config.seq_len + 1)):
      yield i, {"inputs": w[:-1], "targets": w[1:],
                "weights": np.ones(len(w) - 1, np.float32)}


@registry.register("task", "text")
class Text:
  """Byte-level LM on local text files given by `path` (a path or glob)."""

  model = "lm"

  def __init__(self, path: str = "", eval_fraction: float = 0.1, *,
               seq_len: int):
    if not 0 < eval_fraction < 1:
      raise ValueError(f"task text(eval_fraction={eval_fraction}) must be in "
                       "(0, 1)")
    data, files = read_bytes(path)
    per_split = min(len(data) * eval_fraction,
                    len(data) * (1 - eval_fraction))
    if per_split < seq_len + 1:
      raise ValueError(
          f"task text(path={path!r}): {len(data)} bytes leave no "
          f"window of data.seq_len + 1 = {seq_len + 1} bytes in each split")
    digest = hashlib.sha1(data).hexdigest()[:12]
    self.config = TextConfig(
        name=f"t{seq_len}_e{eval_fraction}_{digest}", path=path,
        seq_len=seq_len, eval_fraction=eval_fraction,
        description=f"bytes of {len(files)} file(s)")
    self.model_args = {"vocab_size": 256}

  def sources(self, data_dir: str | None):
    """train, and eval whose examples also mark recall hits (`hits`)."""
    sources = prepare_and_load(TextBuilder, self.config, data_dir,
                               {"train": "train", "eval": "validation"})
    return {"train": sources["train"], "eval": WithHits(sources["eval"])}


def recall_hits(inputs_T: np.ndarray) -> np.ndarray:
  """T bool: whether the bigram ending at each position (the byte before
  it and itself) occurred earlier in the sequence, so that the next byte
  can be recalled from what followed it then (Zoology's "AR hits", Arora
  et al. 2023, section 3). Position 0 has no bigram."""
  x = np.asarray(inputs_T)
  hits = np.zeros(len(x), bool)
  seen = set()
  for t in range(1, len(x)):
    bigram = (int(x[t - 1]), int(x[t]))
    hits[t] = bigram in seen
    seen.add(bigram)
  return hits


class WithHits:
  """A random-access source whose examples gain `hits` (`recall_hits` of
  their inputs), so the LM's loss splits into recall hits and the rest."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    example = dict(self.source[i])
    example["hits"] = recall_hits(example["inputs"])
    return example
