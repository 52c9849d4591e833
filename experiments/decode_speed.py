"""Decode speed: tokens/s of token-by-token decoding and the decode state's
memory against context length, per attention family, and the speedup over
recomputing the forward pass for every new token.

For each op and context length L: a decoder LM (batch 1, no positions, so
every op is timed alike) prefills L random tokens into a decode state of
capacity L + steps (KV cache, KV cache with the pattern's row, ring buffer
or recurrent state; zoo/attention/base.py), then decodes `steps` tokens in one
compiled loop (greedy, the cache donated), timed as the median of
`repeats` runs. Memory is the bytes of every layer's decode state.
Recompute is one forward pass over L tokens: what the next token costs
without a decode state (lengths up to `recompute_max_len`). Writes
RESULTS.md, raw.json and decode_speed.png under
experiments/results/decode_speed/.

  python -m experiments.decode_speed                  # CPU default
  python -m experiments.decode_speed --quick --out=/tmp/d   # smoke test
  python -m experiments.decode_speed --preset=gpu     # accelerator sizes
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments import report
from zoo import layers, registry, xla_flags
from zoo.attention.base import AttentionOp

NAME = "decode_speed"
VOCAB = 256

PRESETS = {
    "quick": dict(lengths=[32, 64], num_layers=1, embed_dim=32, num_heads=2,
                  mlp_dim=64, steps=4, repeats=1, recompute_max_len=64),
    "cpu": dict(lengths=[256, 512, 1024, 2048, 4096, 8192, 16384],
                num_layers=4, embed_dim=256, num_heads=4, mlp_dim=1024,
                steps=64, repeats=5, recompute_max_len=4096),
    "gpu": dict(lengths=[1024, 4096, 16384, 65536], num_layers=12,
                embed_dim=768, num_heads=12, mlp_dim=3072, steps=128,
                repeats=5, recompute_max_len=16384),
}
# The families: the KV cache (blockwise: its prefill stays linear in memory
# at 16K; standard and xla decode alike), the KV cache with a pattern's row,
# the ring buffer and the recurrent state (elu+1, FAVOR+ and the gated and
# delta-rule families).
OPS = ["blockwise", "bigbird", "local", "linear", "linear(feature='favor')",
       "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "based"]


def _family(op, cache) -> str:
  """The decode state of `op`, in words: its state's class, and for a KV
  cache whether a pattern narrows the keys a query reads."""
  name = type(cache.layers[0][0]).__name__
  pattern = type(op).cache_rows is not AttentionOp.cache_rows
  return {"KVCache": "KV cache + pattern row" if pattern else "KV cache",
          "Ring": "ring buffer",
          "RecurrentState": "recurrent state",
          "RecurrenceState": "recurrent state (gated)",
          "DeltaState": "recurrent state (delta rule)"}.get(name, name)

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset.")
_QUICK = flags.DEFINE_bool("quick", False, "The smoke-test preset (same as "
                           "--preset=quick).")
_OPS = flags.DEFINE_list("ops", OPS, "Attention specs.")
_OUT = flags.DEFINE_string("out", "", "Output folder (default "
                           "experiments/results/decode_speed).")


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(spec: str, length: int, p: dict) -> dict:
  """Decode tokens/s, decode-state bytes and recompute tokens/s of `spec`
  at context `length`."""
  model = registry.get("model", "lm")(layers.ModelConfig(
      vocab_size=VOCAB, seq_len=length, attention=spec, position="none",
      num_layers=p["num_layers"], embed_dim=p["embed_dim"],
      num_heads=p["num_heads"], num_kv_heads=p["num_heads"],
      mlp_dim=p["mlp_dim"]), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  steps = p["steps"]
  tokens_1xL = jax.random.randint(jax.random.key(1), (1, length), 0, VOCAB)

  @jax.jit
  def prefill(state, tokens_1xL):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(1, length + steps)
    logits_1xLxV, cache = model.prefill(tokens_1xL, cache)
    return jnp.argmax(logits_1xLxV[:, -1], -1), cache

  @functools.partial(jax.jit, donate_argnums=2)
  def decode_steps(state, token_1, cache):
    model = nnx.merge(graphdef, state)

    def one(_, carry):
      token_1, cache = carry
      logits_1xV, cache = model.decode_step(token_1, cache)
      return jnp.argmax(logits_1xV, -1), cache

    return jax.lax.fori_loop(0, steps, one, (token_1, cache))

  token_1, cache = prefill(state, tokens_1xL)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache.layers))
  start = int(cache.index)
  times = []
  for _ in range(p["repeats"] + 1):  # the first compiles
    begin = time.perf_counter()
    cache = jax.block_until_ready(
        decode_steps(state, token_1,
                     cache.replace(index=jnp.int32(start)))[1])
    times.append(time.perf_counter() - begin)
  decode_s = float(np.median(times[1:]))
  row = {"op": spec, "length": length,
         "family": _family(model.trunk.blocks[0].attention.op, cache),
         "decode_tokens_per_s": steps / decode_s, "cache_bytes": cache_bytes,
         "recompute_tokens_per_s": None, "speedup": None}
  if length <= p["recompute_max_len"]:
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(
        tokens)[:, -1])
    jax.block_until_ready(forward(state, tokens_1xL))  # compile
    recompute_s = _median_seconds(lambda: forward(state, tokens_1xL),
                                  p["repeats"])
    row["recompute_tokens_per_s"] = 1 / recompute_s
    row["speedup"] = row["decode_tokens_per_s"] * recompute_s
  return row


def main(argv):
  del argv
  xla_flags.apply()  # before jax starts: compile as the trainer does
  preset = "quick" if _QUICK.value else _PRESET.value
  p = PRESETS[preset]
  load_before = os.getloadavg()[0]
  rows = []
  for spec in _OPS.value:
    for length in p["lengths"]:
      rows.append(measure(spec, length, p))
      print(rows[-1], flush=True)
  _write(rows, preset, p, load_before, os.getloadavg()[0])


def _write(rows, preset, p, load_before, load_after):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  folder = report.results_dir(NAME, _OUT.value)
  specs = list(dict.fromkeys(r["op"] for r in rows))
  lengths = p["lengths"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  keys = (("decode_tokens_per_s", "decode tokens/s"),
          ("cache_bytes", "decode state bytes (all layers)"),
          ("speedup", "speedup over recomputing"))
  for spec in specs:
    mine = [r for r in rows if r["op"] == spec]
    for ax, (key, _) in zip(axes, keys):
      pts = [(r["length"], r[key]) for r in mine if r[key]]
      if pts:
        ax.loglog(*zip(*pts), marker="o", label=spec)
  for ax, (_, label) in zip(axes, keys):
    ax.set(xlabel="context length", ylabel=label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  device = jax.devices()[0].device_kind
  fig.suptitle(f"decoding on {device} (batch 1, {p['num_layers']} layers, "
               f"embed {p['embed_dim']}, {p['num_heads']} heads)")
  fig.tight_layout()
  fig.savefig(os.path.join(folder, f"{NAME}.png"), dpi=110)

  def at(spec, length, key, scale=1):
    row = next((r for r in rows if r["op"] == spec and r["length"] == length),
               None)
    return "-" if row is None or row[key] is None else row[key] / scale

  families = {r["op"]: r["family"] for r in rows}
  speed = report.markdown_table(
      ["op", "decode state"] + [f"tok/s @{t}" for t in lengths],
      [[s, families[s]] + [at(s, t, "decode_tokens_per_s") for t in lengths]
       for s in specs])
  memory = report.markdown_table(
      ["op"] + [f"MiB @{t}" for t in lengths],
      [[s] + [at(s, t, "cache_bytes", 2**20) for t in lengths]
       for s in specs])
  recompute = report.markdown_table(
      ["op", "length", "decode tok/s", "recompute tok/s", "speedup"],
      [[r["op"], r["length"], r["decode_tokens_per_s"],
        r["recompute_tokens_per_s"], r["speedup"]]
       for r in rows if r["speedup"] is not None])
  ncpu = os.cpu_count()
  body = (
      f"Device: {device} ({ncpu} CPUs visible), jax {jax.__version__}; "
      f"preset `{preset}`: layers {p['num_layers']}, embed {p['embed_dim']}, "
      f"{p['num_heads']} heads (kv heads alike), MLP {p['mlp_dim']}, "
      f"vocabulary {VOCAB}, batch 1, no positions; {p['steps']} decode "
      f"steps per timed run, median of {p['repeats']}. Load average (1 "
      f"min) {load_before:.1f} at the start and {load_after:.1f} at the "
      f"end on {ncpu} CPUs"
      + (": the machine was shared with other jobs, so timings are noisy."
         if max(load_before, load_after) > 0.5 * ncpu else ".")
      + f"\n\n## Decode tokens/s\n\n{speed}\n\n"
      f"## Decode state memory (MiB, all layers, capacity L + "
      f"{p['steps']})\n\n{memory}\n\n"
      "## Against recomputing the forward pass for each token\n\n"
      f"{recompute}\n\n![{NAME}]({NAME}.png)\n")
  report.write(NAME, "Decode speed and memory against context length",
               body, {"preset": preset, "sizes": p, "rows": rows,
                      "load_average": [load_before, load_after],
                      "device": device}, _OUT.value)


if __name__ == "__main__":
  app.run(main)
