"""Time and memory of every registered attention op against sequence length.

For each op: forward and forward+backward wall time (median and minimum of
--repeats runs after a warm-up) and peak memory (XLA's buffer assignment for
the compiled program: arguments + outputs + temporaries), batch --batch
(default 1), 4 heads, head_dim 64, causal. Fits the growth exponent (log-log slope of the minimum
fwd+bwd time) over --fit_lengths; for pattern ops (local, sparse, BigBird)
also against the visited (query, key) pairs, T x keys per query, which is
the fair measure where a pattern's budget grows with T by definition
(strided sparse adds T / block keys per query). With --torch, PyTorch's
scaled_dot_product_attention beside them and blockwise's time as a ratio to
it. Freed host memory is kept for reuse, as the trainer does
(zoo/host_memory.py). Writes RESULTS.md, raw.json and cost.png under
experiments/results/attention_cost/.

  python -m experiments.attention_cost                    # CPU default
  python -m experiments.attention_cost --lengths=1024,4096,16384,65536  # GPU
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import report, timing
from zoo import host_memory, registry, xla_flags

HEADS, HEAD_DIM = 4, 64
DENSE = ("standard", "xla")
PATTERNS = ("local", "sparse", "bigbird")


def _inputs(t, batch, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (batch, t, HEADS, HEAD_DIM), dtype)
          for k in keys]


def _gates(op, t, batch):
  """Fixed gates for an op that takes them: log forget gates g in about
  (-1, 0) per kv head and step, beta in (0, 1), Mamba-2's skip d ones."""
  logits = jax.random.normal(jax.random.key(2), (batch, t, HEADS))
  made = {"g": jax.nn.log_sigmoid(logits + 3.0),
          "beta": jax.nn.sigmoid(logits), "d": jnp.ones_like(logits)}
  return {name: made[name] for name in op.gates}


def measure(spec: str, t: int, repeats: int, limit: float, batch: int = 1):
  op = registry.build("attention", spec)
  gates = _gates(op, t, batch)
  forward = jax.jit(lambda q, k, v: op(q, k, v, causal=True, **gates))
  cotangent = jax.random.normal(jax.random.key(1),
                                (batch, t, HEADS, HEAD_DIM))
  both = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(
      op(q, k, v, causal=True, **gates), cotangent), argnums=(0, 1, 2)))
  args = _inputs(t, batch)
  row = {"op": spec, "length": t}
  for name, fn in (("forward", forward), ("forward_backward", both)):
    compiled = fn.lower(*args).compile()
    row[f"{name}_bytes"] = timing.peak_bytes(compiled)
    if row[f"{name}_bytes"] > limit * 2**30:
      row[f"{name}_s"] = None
      continue
    times = timing.seconds(compiled, args, repeats)
    row[f"{name}_s"] = float(np.median(times))
    row[f"{name}_min_s"] = min(times)
  if registry.parse(spec)[0] in PATTERNS:
    row["keys_per_query"] = op.keys_per_query(t, causal=True)
  return row


def measure_torch(t: int, repeats: int, batch: int = 1):
  import torch  # optional, only with --torch
  import torch.nn.functional as F
  q, k, v = (torch.randn(batch, HEADS, t, HEAD_DIM, requires_grad=True)
             for _ in range(3))
  grad = torch.randn(batch, HEADS, t, HEAD_DIM)

  def run():
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad)

  times = timing.seconds(run, (), repeats)
  return {"op": "torch_sdpa", "length": t,
          "forward_backward_s": float(np.median(times)),
          "forward_backward_min_s": min(times)}


def default_specs() -> list[str]:
  """Every registered op at its defaults, FAVOR+ beside elu linear, and the
  XLA forms of blockwise and linear beside their defaults (the fused
  kernels on CPU); not splash, which off TPU/GPU runs its pattern's op."""
  specs = [n for n in registry.names("attention") if n != "splash"]
  return specs + ["linear(feature='favor')", "blockwise(implementation='xla')",
                  "linear(implementation='xla')",
                  "linear(feature='favor', implementation='xla')"]


def exponent(rows, key, lo, hi, against="length"):
  """Log-log slope of `key` against `against` over lengths lo..hi (None
  with fewer than two points)."""
  pts = [(r[against], r[key]) for r in rows
         if r.get(key) and lo <= r["length"] <= hi]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def main(argv):
  del argv
  # As the trainer runs (see zoo/xla_flags.py and zoo/host_memory.py).
  xla_flags.apply()
  host_memory.retain()
  f = flags.FLAGS
  specs = f.ops or default_specs()
  lengths = [int(t) for t in f.lengths]
  rows = []
  for spec in specs:
    for t in lengths:
      if registry.parse(spec)[0] in DENSE and t > f.dense_max_len:
        continue
      rows.append(measure(spec, t, f.repeats, f.memory_limit_gib, f.batch))
      print(rows[-1], flush=True)
  if f.torch:
    for t in lengths:
      rows.append(measure_torch(t, f.repeats, f.batch))
      print(rows[-1], flush=True)
  lo, hi = (int(t) for t in f.fit_lengths)
  summary = []
  for spec in specs + (["torch_sdpa"] if f.torch else []):
    mine = [r for r in rows if r["op"] == spec]
    for r in mine:
      if "keys_per_query" in r:
        r["pairs"] = r["length"] * r["keys_per_query"]
    summary.append({
        "op": spec,
        "time_exponent": exponent(mine, "forward_backward_min_s", lo, hi),
        "pair_exponent": exponent(mine, "forward_backward_min_s", lo, hi,
                                  "pairs") if "pairs" in mine[0] else None,
        "memory_exponent": exponent(mine, "forward_backward_bytes", lo, hi),
        **{f"fwd_bwd_s@{r['length']}": r.get("forward_backward_min_s")
           for r in mine}})
  _write(rows, summary, lengths, lo, hi)


def _write(rows, summary, lengths, lo, hi):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  folder = report.results_dir("attention_cost", flags.FLAGS.out)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for s in summary:
    mine = [r for r in rows if r["op"] == s["op"]]
    for ax, key in zip(axes, ("forward_backward_s", "forward_backward_bytes")):
      pts = [(r["length"], r[key]) for r in mine if r.get(key)]
      if pts:
        ax.loglog(*zip(*pts), marker="o", label=s["op"])
  axes[0].set(xlabel="sequence length", ylabel="causal fwd+bwd seconds")
  axes[1].set(xlabel="sequence length", ylabel="peak bytes (XLA)")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"attention cost on {jax.devices()[0].device_kind} "
               f"(batch {flags.FLAGS.batch}, {HEADS} heads, head_dim "
               f"{HEAD_DIM}, causal)")
  fig.tight_layout()
  fig.savefig(f"{folder}/cost.png", dpi=110)
  header = ["op", "time exponent", "exponent vs pairs",
            "memory exponent"] + [f"fwd+bwd s @{t}" for t in lengths]
  table = report.markdown_table(header, [
      [s["op"], s["time_exponent"] or "-", s["pair_exponent"] or "-",
       s["memory_exponent"] or "-"]
      + [s.get(f"fwd_bwd_s@{t}") or "-" for t in lengths] for s in summary])
  detail = report.markdown_table(
      ["op", "length", "keys per query", "fwd s", "fwd+bwd s (median)",
       "fwd+bwd s (min)", "fwd+bwd peak MiB"],
      [[r["op"], r["length"], r.get("keys_per_query") or "-",
        r.get("forward_s") or "-", r.get("forward_backward_s") or "-",
        r.get("forward_backward_min_s") or "-",
        (r["forward_backward_bytes"] / 2**20
         if r.get("forward_backward_bytes") else "-")] for r in rows])
  body = (f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}. "
          f"Batch {flags.FLAGS.batch}, {HEADS} heads, head_dim {HEAD_DIM}, "
          f"causal. Times are the minimum of {flags.FLAGS.repeats} runs after a "
          "warm-up "
          f"(medians in the full table). Exponents are log-log slopes over "
          f"lengths {lo}..{hi}: of time against length, and for pattern ops "
          "of time against visited pairs (length x keys per query); '-' = "
          "not run (dense ops past --dense_max_len, or over the memory "
          "limit). Peak bytes are XLA's buffer assignment: the fused CPU "
          "kernels' own scratch (blockwise: about 8 x length x head_dim "
          "floats per thread in the backward; linear: a few 64-row chunks "
          "per thread) is not in it."
          f"\n\n{table}\n\n![cost](cost.png)\n\n")
  torch = {r["length"]: r["forward_backward_min_s"] for r in rows
           if r["op"] == "torch_sdpa"}
  if torch:
    ratios = report.markdown_table(
        ["op", "length", "s", "torch SDPA s", "op / torch"],
        [[r["op"], r["length"], r["forward_backward_min_s"],
          torch[r["length"]],
          r["forward_backward_min_s"] / torch[r["length"]]] for r in rows
         if registry.parse(r["op"])[0] == "blockwise"
         and r.get("forward_backward_min_s") and r["length"] in torch])
    body += ("## Blockwise against PyTorch (causal fwd+bwd, minimum "
             f"times)\n\n{ratios}\n\n")
  body += f"## All points\n\n{detail}\n"
  report.write("attention_cost", "Attention cost against sequence length",
               body, {"rows": rows, "summary": summary}, flags.FLAGS.out)


def _define_flags():
  """Flags; defined only when run as a program, so importing this module
  (tests, other benchmarks) defines none."""
  flags.DEFINE_list(
      "lengths", ["256", "512", "1024", "2048", "4096", "8192", "16384"],
      "Sequence lengths.")
  flags.DEFINE_list("ops", [], "Attention specs (default: every registered "
                    "op with default arguments).")
  flags.DEFINE_integer("repeats", 5, "Timed runs per point.")
  flags.DEFINE_integer("batch", 1, "Batch size of every point.")
  flags.DEFINE_list("fit_lengths", ["2048", "8192"], "Shortest and longest "
                    "length of the exponent fits.")
  flags.DEFINE_integer("dense_max_len", 8192, "Longest length for ops that "
                       "build the full score matrix (standard, xla).")
  flags.DEFINE_float("memory_limit_gib", 4.0, "Points whose compiled "
                     "program needs more are skipped.")
  flags.DEFINE_bool("torch", False, "Also time PyTorch's "
                    "scaled_dot_product_attention (if installed).")
  flags.DEFINE_string("out", "", "Output folder (default "
                      "experiments/results/attention_cost).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
