"""Whole-model throughput and memory against sequence length, per attention
family: "at my length, which variant trains (and prefills) faster".

  python -m experiments.model_throughput            # CPU default
  python -m experiments.model_throughput --quick    # smoke test

The LM of `configs/text.py` (4 layers, width 256, 4 heads, MLP 1024,
vocabulary 256) with each attention spec, at lengths 256..16384 with the
tokens per step held constant (batch = tokens / length): the trainer's
compiled train step (AdamW, sharding, finiteness checks: what
`zoo.train` runs) and the forward pass alone (inference prefill), each timed
as the median of --repeats runs after a warm-up, with peak memory from XLA's
buffer assignment. A point whose program needs more than --memory_limit_gib
is recorded as over the limit and not run. Each finished point is saved at
once, so a rerun with the same --out resumes. Crossover: the shortest
measured length from which an op's train tokens/s stays above blockwise's.
Freed host memory is kept for reuse, as the trainer does
(zoo/host_memory.py).
"""

import json
import os

import jax
import matplotlib
from absl import app, flags
from flax import nnx

from configs import text
from experiments import lm_step, report, timing
from zoo import host_memory, xla_flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPECS = ["standard", "xla", "blockwise", "blockwise(implementation='xla')",
         "local", "sparse", "bigbird", "linear", "linear(feature='favor')",
         "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "based"]


def make_config(spec: str, length: int, tokens: int, quick: bool):
  config = text.get_config()
  config.model.attention = spec
  config.model.num_layers, config.model.embed_dim = 4, 256
  config.model.num_heads = config.model.num_kv_heads = 4
  config.model.mlp_dim = 1024
  if quick:
    config.model.num_layers, config.model.embed_dim = 1, 32
    config.model.mlp_dim = 64
  config.data.seq_len, config.batch_size = length, max(tokens // length, 1)
  config.mesh.data = 1
  return config


def measure(spec: str, length: int, tokens: int, repeats: int, limit: float,
            quick: bool) -> dict:
  """Train-step and forward time and peak memory of one point."""
  config = make_config(spec, length, tokens, quick)
  b = config.batch_size
  lm = lm_step.build(config)
  graphdef, abstract_state = lm.setup.graphdef, lm.setup.abstract_state
  row = {"spec": spec, "length": length, "batch": b}
  with lm.context():
    step = lm.compile_step(donate=False)  # timed on one state, repeatedly
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)[0](x)
                      ).lower(abstract_state, lm.batch["inputs"]).compile()
    row["train_bytes"] = timing.peak_bytes(step)
    row["forward_bytes"] = timing.peak_bytes(forward)
    if row["train_bytes"] > limit * 2**30:
      row["over_limit"] = True
      return row
    state = lm.init_state()
    row["train_s"] = timing.median_seconds(step, (state, lm.batch), repeats)
    row["forward_s"] = timing.median_seconds(
        forward, (state, lm.batch["inputs"]), repeats)
  row["train_tokens_per_s"] = b * length / row["train_s"]
  row["forward_tokens_per_s"] = b * length / row["forward_s"]
  return row


def crossover(rows, spec: str, baseline: str = "blockwise"):
  """Shortest length from which `spec` trains faster than `baseline` at
  every longer measured length (None if never)."""
  speed = {(r["spec"], r["length"]): r.get("train_tokens_per_s")
           for r in rows}
  lengths = sorted({r["length"] for r in rows})
  faster = [bool(speed.get((spec, t)) and speed.get((baseline, t))
                 and speed[(spec, t)] > speed[(baseline, t)])
            for t in lengths]
  for i, t in enumerate(lengths):
    if all(faster[i:]):
      return t
  return None


def longest_fitting(rows, spec: str):
  """Longest measured length whose train step fit the memory limit, if
  every shorter one fit too (None if the shortest did not)."""
  best = None
  for r in sorted((r for r in rows if r["spec"] == spec),
                  key=lambda r: r["length"]):
    if r.get("over_limit"):
      break
    best = r["length"]
  return best


def main(argv):
  del argv
  # As the trainer runs (see zoo/xla_flags.py and zoo/host_memory.py).
  xla_flags.apply()
  host_memory.retain()
  f = flags.FLAGS
  quick = f.quick
  specs = ["standard", "blockwise", "local"] if quick else f.specs
  lengths = [64, 128] if quick else [int(t) for t in f.lengths]
  tokens = 256 if quick else f.tokens_per_step
  folder = report.results_dir("model_throughput", f.out)
  points_path = os.path.join(folder, "points.jsonl")
  done = {}
  if os.path.exists(points_path):
    with open(points_path) as fh:
      for line in fh:
        row = json.loads(line)
        done[(row["spec"], row["length"])] = row
  for spec in specs:
    for t in lengths:
      if (spec, t) in done:
        continue
      row = measure(spec, t, tokens, f.repeats, f.memory_limit_gib, quick)
      done[(spec, t)] = row
      with open(points_path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
      print(json.dumps(row))
  rows = [done[(s, t)] for s in specs for t in lengths]
  _plot(os.path.join(folder, "model_throughput.png"), rows, specs, lengths)
  fmt = lambda r, key: ("over limit" if r.get("over_limit")
                        else f"{r[key]:.0f}")
  table = report.markdown_table(
      ["spec", "length", "batch", "train tokens/s", "prefill tokens/s",
       "train peak MiB", "prefill peak MiB"],
      [[r["spec"], r["length"], r["batch"], fmt(r, "train_tokens_per_s"),
        fmt(r, "forward_tokens_per_s"), r["train_bytes"] / 2**20,
        r["forward_bytes"] / 2**20] for r in rows])
  crossovers = report.markdown_table(
      ["spec", "trains faster than blockwise from length"],
      [[s, crossover(rows, s) or "never (in the lengths measured)"]
       for s in specs if s != "blockwise"])
  body = "\n\n".join([
      f"Device: {jax.devices()[0].platform}, jax {jax.__version__}. LM of "
      "configs/text.py sized "
      + ("1 layer, width 32" if quick else "4 layers, width 256, 4 heads, "
         "MLP 1024") + f", vocabulary 256, {tokens} tokens per step; "
      f"medians of {f.repeats} runs after a warm-up. 'over limit': the "
      f"compiled train step needs more than {f.memory_limit_gib:g} GiB, not "
      "run.", table, "![throughput](model_throughput.png)",
      "## Crossover against blockwise (train tokens/s)", crossovers,
      "## Where each op stops fitting", report.markdown_table(
          ["spec", f"longest length within {f.memory_limit_gib:g} GiB"],
          [[s, longest_fitting(rows, s) or "none"] for s in specs])])
  report.write("model_throughput", "Model throughput and memory against "
               "length", body, {"rows": rows}, f.out)


def _plot(path, rows, specs, lengths):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for spec in specs:
    pts = [r for r in rows if r["spec"] == spec and not r.get("over_limit")]
    axes[0].plot([r["length"] for r in pts],
                 [r["train_tokens_per_s"] for r in pts], "o-", label=spec)
    axes[1].plot([r["length"] for r in rows if r["spec"] == spec],
                 [r["train_bytes"] / 2**20 for r in rows
                  if r["spec"] == spec], "o-", label=spec)
  for ax, label in zip(axes, ("train tokens/s", "train step peak MiB")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("length")
    ax.set_ylabel(label)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _define_flags():
  """Flags; defined only when run as a program, so importing this module
  (tests, other benchmarks) defines none."""
  flags.DEFINE_list("specs", SPECS, "Attention specs.")
  flags.DEFINE_list(
      "lengths", ["256", "512", "1024", "2048", "4096", "8192", "16384"],
      "Sequence lengths.")
  flags.DEFINE_integer("tokens_per_step", 16384,
                       "Tokens per step (batch = tokens / length).")
  flags.DEFINE_integer("repeats", 3, "Timed runs per point.")
  flags.DEFINE_float("memory_limit_gib", 12.0, "Points whose compiled train "
                     "step needs more are not run.")
  flags.DEFINE_bool("quick", False, "Tiny model, 2 short lengths, 3 specs.")
  flags.DEFINE_string("out", "", "Output folder (default "
                      "experiments/results/model_throughput).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
