"""Sampler: `python -m zoo.sample --workdir=DIR --prompt='ROMEO:'`.

Loads the newest readable checkpoint of a byte-level text run (DIR/config.json
says which model; `zoo.checkpoint.restore_model` reads it) and prints the prompt
and its continuation, drawn by `zoo.sampling.generate` (prefill, then one
compiled loop). `main` is a thin absl shell around `sample_bytes`; bad inputs
(no run or checkpoint, a task other than text, a prompt the model cannot
place, bad sampling values) get one line on stderr and exit code 2.
"""

import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from zoo import checkpoint, plan, registry
from zoo.sampling import Sampling, generate


class SampleError(ValueError):
  """An input the sampler refuses before generating."""


def load(workdir: str):
  """(config, model, step) of `workdir`'s newest readable checkpoint of a
  text run; raises SampleError."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise SampleError(f"--workdir={workdir}: no config.json (not a zoo.train "
                      "run directory)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = registry.parse(config.data.task)[0]
  if task != "text":
    raise SampleError(f"--workdir={workdir}: data.task is {task!r}; "
                      "zoo.sample generates from byte-level text runs (task "
                      "text)")
  # Sampling runs on this machine's devices, whatever mesh trained the run.
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  try:
    model, step = checkpoint.restore_model(config, workdir)
  except (plan.ConfigError, FileNotFoundError) as e:
    raise SampleError(f"--workdir={workdir}: {e}") from None
  return config, model, step


def sample_bytes(workdir: str, prompt: str, *, max_new_tokens: int,
                 sampling: Sampling, seed: int = 0) -> bytes:
  """The prompt's UTF-8 bytes and their continuation, generation ending
  after the stop token."""
  prompt_P = list(prompt.encode("utf-8"))
  if not prompt_P:
    raise SampleError("--prompt is empty; give at least one character")
  if max_new_tokens < 1:
    raise SampleError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  _, model, _ = load(workdir)
  p, limit = len(prompt_P), model.trunk.position.max_length()
  if limit is not None and p > limit:
    raise SampleError(f"--prompt of {p} bytes is longer than the {limit} "
                      "positions this model's position encoding places")
  if limit is not None and p + max_new_tokens - 1 > limit:
    raise SampleError(
        f"--prompt of {p} bytes + --max_new_tokens={max_new_tokens} need "
        f"{p + max_new_tokens - 1} positions; this model's position encoding "
        f"places {limit}: use at most {limit - p + 1} new tokens")
  vocab = model.head.out_features
  if sampling.stop_token is not None and sampling.stop_token >= vocab:
    raise SampleError(f"--stop_token={sampling.stop_token} must be a byte "
                      f"value below {vocab}")
  if sampling.top_k > vocab:
    raise SampleError(f"--top_k={sampling.top_k} must be at most {vocab}")
  tokens_1xN, lengths_1 = generate(
      model, jnp.asarray([prompt_P]), max_new_tokens=max_new_tokens,
      sampling=sampling, seed=seed)
  new = jax.device_get(tokens_1xN)[0, :int(lengths_1[0])].tolist()
  return bytes(prompt_P + new)


def _define_flags():
  """Flags; defined only when run as a program."""
  flags.DEFINE_string("workdir", None, "Run directory of a text run "
                      "(zoo.train --config=configs/text.py:FILE).")
  flags.DEFINE_string("prompt", "\n", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate at most.")
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely bytes; 0 = all.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus: keep the most likely bytes "
                     "holding this probability; 1 = all.")
  flags.DEFINE_integer("stop_token", None, "Byte value that ends the "
                       "generation (e.g. 10 for a newline); none by default.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    if not f.workdir:
      raise SampleError("--workdir is required")
    sampling = _sampling(f.temperature, f.top_k, f.top_p, f.stop_token)
    text = sample_bytes(f.workdir, f.prompt, max_new_tokens=f.max_new_tokens,
                        sampling=sampling, seed=f.seed)
  except SampleError as e:
    print(f"sample error: {e}", file=sys.stderr)
    sys.exit(2)
  print(text.decode("utf-8", errors="replace"))


def _parse_flags(argv):
  """Flag errors (a malformed value) exit 2 with one line, like other bad
  inputs."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"sample error: {e}", file=sys.stderr)
    sys.exit(2)


def _sampling(temperature: float, top_k: int, top_p: float,
              stop_token: Optional[int]) -> Sampling:
  try:
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                           stop_token=stop_token)
  except ValueError as e:
    raise SampleError(f"--{e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
