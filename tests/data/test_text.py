import numpy as np
import pytest

from zoo import registry


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes(bytes(range(256)) * 8)  # 2048 bytes
  return str(path)


def test_windows_split_and_shift(text_file, data_dir):
  task = registry.build("task", f"text(path={text_file!r})", seq_len=15)
  sources = task.sources(data_dir)
  data = np.frombuffer(open(text_file, "rb").read(), np.uint8)
  cut = int(len(data) * 0.9)
  assert len(sources["train"]) == cut // 16
  assert len(sources["eval"]) == (len(data) - cut) // 16
  train_windows = {bytes(np.append(ex["inputs"], ex["targets"][-1])
                         .astype(np.uint8)) for ex in sources["train"]}
  for ex in sources["train"]:
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    assert ex["weights"].all()
  first_eval = sources["eval"][0]
  # Eval windows come from the last 10% of the bytes, after the cut.
  window = bytes(np.append(first_eval["inputs"], first_eval["targets"][-1])
                 .astype(np.uint8))
  assert window in bytes(data[cut:])
  assert set(train_windows) and all(w in bytes(data[:cut])
                                    for w in train_windows)


def test_missing_or_empty_path_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no file matches"):
    registry.build("task", "text(path='/no/such/*.txt')", seq_len=16)
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="the files are empty"):
    registry.build("task", f"text(path='{tmp_path}/empty.txt')", seq_len=16)
  with pytest.raises(ValueError, match="no file matches"):
    registry.build("task", "text()", seq_len=16)


def test_recall_hits_mark_bigrams_seen_before(text_file, data_dir):
  from zoo.data.text import recall_hits
  # "abcab" + "c": the bigram ending at the second b (a, b) was seen.
  x = np.array([ord(c) for c in "abcabcx"])
  assert recall_hits(x).tolist() == [False, False, False, False, True, True,
                                     False]
  task = registry.build("task", f"text(path={text_file!r})", seq_len=15)
  example = task.sources(data_dir)["eval"][0]
  np.testing.assert_array_equal(example["hits"],
                                recall_hits(example["inputs"]))
