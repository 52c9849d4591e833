"""zoo/sample.py: generating from a byte-level text run's checkpoint, and the
one-line refusals (exit 2) of bad inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import text
from zoo import sample, train
from zoo.sampling import Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, data_dir):
  """A text run of 30 steps on generated text, with learned positions (a
  table of 32)."""
  tmp = tmp_path_factory.mktemp("sample")
  corpus = tmp / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["ROMEO:", "JULIET:", "love", "night", "the", "and", "light"]
  corpus.write_text(" ".join(rng.choice(words, 3000)) + "\n")
  config = text.get_config(str(corpus))
  config.num_train_steps = 30
  config.batch_size = 8
  config.log_every_steps = 10
  config.eval_every_steps = 30
  config.checkpoint_every_steps = 30
  config.warmup_steps = 5
  config.model.position = "learned"
  config.model.num_layers = 1
  config.model.embed_dim = 32
  config.model.mlp_dim = 64
  config.data.seq_len = 32
  config.data.dir = data_dir
  config.mesh.data = 1
  workdir = str(tmp / "run")
  train.train_and_evaluate(config, workdir)
  return workdir


def test_generates_from_the_newest_checkpoint(text_run):
  out = sample.sample_bytes(text_run, "ROMEO:", max_new_tokens=20,
                            sampling=GREEDY)
  assert out.startswith(b"ROMEO:") and len(out) == 26
  again = sample.sample_bytes(text_run, "ROMEO:", max_new_tokens=20,
                              sampling=GREEDY)
  assert out == again


def test_a_stop_byte_ends_the_text(text_run):
  free = sample.sample_bytes(text_run, "love", max_new_tokens=20,
                             sampling=GREEDY)
  stop = free[5]
  out = sample.sample_bytes(text_run, "love", max_new_tokens=20,
                            sampling=Sampling(temperature=0,
                                              stop_token=stop))
  assert free.startswith(out) and out[-1] == stop
  assert len(out) <= 6


@pytest.mark.parametrize("prompt,new,message", [
    ("x" * 40, 1, r"--prompt of 40 bytes is longer than the 32 positions "
     r"this model's position encoding places"),
    ("ROMEO:", 40, r"--prompt of 6 bytes \+ --max_new_tokens=40 need 45 "
     r"positions; this model's position encoding places 32: use at most 27 "
     r"new tokens"),
    ("", 5, r"--prompt is empty"),
    ("a", 0, r"--max_new_tokens=0 must be >= 1"),
])
def test_prompts_the_model_cannot_place_are_refused(text_run, prompt, new,
                                                    message):
  with pytest.raises(sample.SampleError, match=message):
    sample.sample_bytes(text_run, prompt, max_new_tokens=new, sampling=GREEDY)


def test_bad_sampling_values_are_refused(text_run):
  with pytest.raises(sample.SampleError, match=r"--temperature=-1.0 must be "
                     r">= 0 \(0: greedy\)"):
    sample._sampling(-1.0, 0, 1.0, None)
  with pytest.raises(sample.SampleError, match=r"--top_p=2.0 must be in "
                     r"\(0, 1\]"):
    sample._sampling(1.0, 0, 2.0, None)
  with pytest.raises(sample.SampleError, match=r"--stop_token=256 must be a "
                     r"byte value below 256"):
    sample.sample_bytes(text_run, "a", max_new_tokens=2,
                       sampling=Sampling(stop_token=256))


def test_runs_that_are_not_text_checkpoints_are_refused(tmp_path, text_run):
  with pytest.raises(sample.SampleError, match=r"no config.json \(not a "
                     r"zoo.train run directory\)"):
    sample.load(str(tmp_path / "nothing"))
  mqar = tmp_path / "mqar"
  mqar.mkdir()
  config = json.load(open(os.path.join(text_run, "config.json")))
  config["data"]["task"] = "mqar(num_pairs=4, vocab_size=64)"
  (mqar / "config.json").write_text(json.dumps(config))
  with pytest.raises(sample.SampleError, match=r"data.task is 'mqar'; "
                     r"zoo.sample generates from byte-level text runs"):
    sample.load(str(mqar))
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  (untrained / "config.json").write_text(
      open(os.path.join(text_run, "config.json")).read())
  with pytest.raises(sample.SampleError, match=r"no readable checkpoint"):
    sample.load(str(untrained))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "zoo.sample", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_command_line_prints_the_text_or_one_error_line(text_run,
                                                            tmp_path):
  ok = _cli(f"--workdir={text_run}", "--prompt=JULIET:",
            "--max_new_tokens=10", "--temperature=0")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stdout.startswith("JULIET:")
  assert ok.stdout == sample.sample_bytes(
      text_run, "JULIET:", max_new_tokens=10, sampling=GREEDY).decode(
          "utf-8", errors="replace") + "\n"
  bad = _cli(f"--workdir={tmp_path}", "--prompt=a")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      f"sample error: --workdir={tmp_path}: no config.json (not a zoo.train "
      "run directory)"]
  assert not bad.stdout
