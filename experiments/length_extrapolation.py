"""Length extrapolation of positional encodings: a byte-level LM trained at one
length, evaluated at 1x, 2x, 4x and 8x that length.

Each encoding trains the same small causal LM (the trainer, configs/text.py
shrunk) on --text_path at --train_len bytes. Evaluation reads the held-out
tail of the file (the text task's eval split), cut into non-overlapping
windows of each length, and reports bits per byte over every position of a
window, plus bits per byte by position at the longest length (where a
window's tokens beyond --train_len are the extrapolated ones). `learned`
gets a table of max(multiples) x train_len; its rows past train_len are
never trained. Writes RESULTS.md, raw.json and length_extrapolation.png
under experiments/results/length_extrapolation/.

  python -m experiments.length_extrapolation --text_path=FILE   # CPU default
  python -m experiments.length_extrapolation --text_path=FILE --preset=gpu
"""

import itertools
import math
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from configs import text as text_config
from experiments import report
from zoo import checkpoint, registry, train, xla_flags
from zoo.data.text import read_bytes, windows

NAME = "length_extrapolation"

# Flag defaults per preset; flags given on the command line win.
PRESETS = {
    "cpu": dict(train_len=64, num_train_steps=600, batch_size=32,
                num_layers=2, embed_dim=64, num_heads=4, mlp_dim=256,
                eval_bytes=32768),
    "gpu": dict(train_len=512, num_train_steps=5000, batch_size=64,
                num_layers=6, embed_dim=384, num_heads=6, mlp_dim=1536,
                eval_bytes=1 << 20),
}

_TEXT = flags.DEFINE_string("text_path", "", "Text file (or glob) to train "
                            "and evaluate on (required).")
_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset.")
_POSITIONS = flags.DEFINE_list(
    "positions", ["none", "sinusoidal", "learned", "rope", "alibi", "t5"],
    "Position specs; a bare `learned` gets max_len = max(multiples) x "
    "train_len.")
_ATTENTION = flags.DEFINE_string("attention", "standard", "Attention spec.")
_MULTIPLES = flags.DEFINE_list("multiples", ["1", "2", "4", "8"],
                               "Evaluation lengths as multiples of train_len.")
_TRAIN_LEN = flags.DEFINE_integer("train_len", None, "Training length.")
_STEPS = flags.DEFINE_integer("num_train_steps", None, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Training batch.")
_LAYERS = flags.DEFINE_integer("num_layers", None, "Layers.")
_EMBED = flags.DEFINE_integer("embed_dim", None, "Model width.")
_HEADS = flags.DEFINE_integer("num_heads", None, "Attention heads.")
_MLP = flags.DEFINE_integer("mlp_dim", None, "MLP width.")
_EVAL_BYTES = flags.DEFINE_integer(
    "eval_bytes", None, "Held-out bytes evaluated at each length (capped "
    "by the eval split).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each encoding "
                           "trains once per seed; tables give the mean and "
                           "95% Student-t interval over them.")
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Folder for the training runs, one per encoding and seed "
    "(default: a fresh temporary folder); reusing one resumes finished runs.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: "
                                "TFDS's).")
_OUT = flags.DEFINE_string("out", "", "Output folder (default "
                           "experiments/results/length_extrapolation).")


def setting(name: str):
  """A size flag's value: the command line's, else the preset's."""
  flag = flags.FLAGS[name]
  return flag.value if flag.present else PRESETS[_PRESET.value][name]


def position_specs(max_len: int) -> list[str]:
  return [f"learned(max_len={max_len})" if p == "learned" else p
          for p in _POSITIONS.value]


def make_config(position: str, train_len: int, seed: int):
  config = text_config.get_config(_TEXT.value)
  config.seed = seed
  config.num_train_steps = setting("num_train_steps")
  config.batch_size = setting("batch_size")
  config.warmup_steps = min(100, config.num_train_steps // 10)
  config.log_every_steps = max(1, config.num_train_steps // 5)
  config.eval_every_steps = config.num_train_steps
  config.checkpoint_every_steps = config.num_train_steps
  config.max_checkpoints_to_keep = 1
  m = config.model
  m.attention, m.position = _ATTENTION.value, position
  m.num_layers, m.embed_dim = setting("num_layers"), setting("embed_dim")
  m.num_heads = m.num_kv_heads = setting("num_heads")
  m.mlp_dim = setting("mlp_dim")
  config.data.seq_len = train_len
  config.data.dir = _DATA_DIR.value
  return config


def eval_bytes(config) -> np.ndarray:
  """The text task's held-out split, as int32 bytes."""
  task = registry.build("task", config.data.task, seq_len=config.data.seq_len)
  data = np.frombuffer(read_bytes(_TEXT.value)[0], np.uint8).astype(np.int32)
  return data[int(len(data) * (1 - task.config.eval_fraction)):]


def bits_by_position(model, data: np.ndarray, length: int, budget: int,
                     batch: int = 8) -> np.ndarray:
  """Mean bits per byte at each position of `length`-byte windows of the
  first `budget` bytes of `data` (next-byte prediction)."""
  w = windows(data[:budget], length + 1)
  if not len(w):
    raise ValueError(f"--eval_bytes={budget} (or the eval split, "
                     f"{len(data)} bytes) is shorter than one window of "
                     f"{length + 1} bytes")
  batch = min(batch, len(w))
  w = w[:len(w) // batch * batch]
  graphdef, state = nnx.split(model)

  @jax.jit
  def bits(state, w_BxL):
    logits = nnx.merge(graphdef, state)(w_BxL[:, :-1])
    xent_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits, w_BxL[:, 1:])
    return xent_BxT.sum(0) / math.log(2)

  total_T = sum(np.asarray(bits(state, jnp.asarray(w[i:i + batch])))
                for i in range(0, len(w), batch))
  return total_T / len(w)


def main(argv):
  del argv
  xla_flags.apply()  # before jax starts: compile as the trainer does
  if not _TEXT.value:
    raise app.UsageError("--text_path is required")
  train_len = setting("train_len")
  multiples = [int(m) for m in _MULTIPLES.value]
  budget = setting("eval_bytes")
  root = _WORKDIR.value or tempfile.mkdtemp(prefix=f"zoo_{NAME}_")
  rows = []
  for position, seed in itertools.product(
      position_specs(max(multiples) * train_len),
      [int(s) for s in _SEEDS.value]):
    config = make_config(position, train_len, seed)
    workdir = os.path.join(root, re.sub(r"[^A-Za-z0-9_.=-]+", "_", position)
                           + f"_seed{seed}")
    start = time.time()
    last = train.train_and_evaluate(config, workdir)
    train_s = time.time() - start
    model, _ = checkpoint.restore_model(config, workdir)
    data = eval_bytes(config)
    by_length = {m * train_len: bits_by_position(model, data, m * train_len,
                                                 budget)
                 for m in multiples}
    rows.append({"position": position, "seed": seed, "train_s": train_s,
                 "train_eval_bits": last.get("eval_bits_per_token"),
                 "bits": {t: float(b.mean()) for t, b in by_length.items()},
                 "bits_by_position": {t: b.tolist()
                                      for t, b in by_length.items()}})
    print(position, seed, {t: round(b, 4)
                           for t, b in rows[-1]["bits"].items()}, flush=True)
  _write(rows, config, train_len, multiples, budget)


def _write(rows, config, train_len, multiples, budget):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  folder = report.results_dir(NAME, _OUT.value)
  lengths = [m * train_len for m in multiples]
  longest = max(lengths)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  bin_ = max(1, train_len // 4)
  positions = list(dict.fromkeys(r["position"] for r in rows))
  summary = {p: {t: report.mean_ci([r["bits"][t] for r in rows
                                    if r["position"] == p])
                 for t in lengths} for p in positions}
  for p in positions:
    axes[0].errorbar(lengths, [summary[p][t][0] for t in lengths],
                     yerr=[np.nan_to_num(summary[p][t][1]) for t in lengths],
                     marker="o", capsize=3, label=p)
    per_pos = np.mean([r["bits_by_position"][longest] for r in rows
                       if r["position"] == p], axis=0)
    binned = per_pos[:len(per_pos) // bin_ * bin_].reshape(-1, bin_).mean(1)
    axes[1].plot(np.arange(len(binned)) * bin_ + bin_ / 2, binned, label=p)
  axes[0].set(xscale="log", xlabel="evaluation length (bytes)",
              ylabel="bits per byte (mean, 95% interval over seeds)")
  axes[0].minorticks_off()
  axes[0].set_xticks(lengths, [str(t) for t in lengths])
  axes[0].axvline(train_len, color="gray", ls=":")
  axes[1].set(xlabel=f"position in a {longest}-byte window",
              ylabel=f"bits per byte (mean over {bin_} positions, seeds)")
  axes[1].axvline(train_len, color="gray", ls=":", label="train length")
  for ax in axes:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  m = config.model
  fig.suptitle(f"trained at {train_len} bytes: {m.num_layers} layers, width "
               f"{m.embed_dim}, {m.num_heads} heads, attention {m.attention}")
  fig.tight_layout()
  fig.savefig(os.path.join(folder, f"{NAME}.png"), dpi=110)
  table = report.markdown_table(
      ["position"] + [f"bpb @{t} ({t // train_len}x)" for t in lengths]
      + ["trainer eval bpb", "train s (mean)"],
      [[p] + [report.format_ci(*summary[p][t]) for t in lengths]
       + [report.format_ci(*report.mean_ci(
           [r["train_eval_bits"] for r in rows if r["position"] == p
            and r["train_eval_bits"] is not None])),
          float(np.mean([r["train_s"] for r in rows
                         if r["position"] == p]))]
       for p in positions])
  body = (
      f"Byte-level LM on `{_TEXT.value}`, trained {config.num_train_steps} "
      f"steps of batch {config.batch_size} at {train_len} bytes "
      f"({m.num_layers} layers, width {m.embed_dim}, {m.num_heads} heads, "
      f"MLP {m.mlp_dim}, attention `{m.attention}`), then evaluated on up to "
      f"{budget} held-out bytes cut into windows of each length. Bits per "
      "byte averaged over every position of a window (lower is better), "
      "mean ± 95% Student-t interval over the seeds "
      f"{', '.join(_SEEDS.value)} (n seeds, n - 1 degrees of freedom); "
      f"device {jax.devices()[0].device_kind}, jax {jax.__version__}.\n\n"
      f"{table}\n\n![length extrapolation]({NAME}.png)\n")
  report.write(NAME, "Length extrapolation of positional encodings", body,
               {"train_len": train_len, "multiples": multiples,
                "eval_bytes": budget, "config": config.to_dict(),
                "rows": rows}, _OUT.value)


if __name__ == "__main__":
  app.run(main)
