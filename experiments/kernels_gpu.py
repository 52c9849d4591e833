"""The GPU kernels of the `splash` op, checked and timed.

On a GPU: checks Pallas flash, cuDNN and the default choice against the dense
`standard` op (values and gradients, causal and bidirectional, grouped-query,
a padding mask where the kernel takes one, and the sparse patterns' logged
fallback to their own op), then times causal forward and forward+backward
in bf16 at 4K-32K against `jax.nn.dot_product_attention` (the `xla` op) and
`blockwise`. Writes RESULTS.md and raw.json under
experiments/results/kernels_gpu/.

  python -m experiments.kernels_gpu                 # a GPU host
  python -m experiments.kernels_gpu --quick --out=/tmp/k   # any machine

`--quick` runs only the checks, at small sizes, with the Pallas kernels in
interpret mode (cuDNN is skipped: it has none). Without a GPU and without
`--quick` the program refuses in one line and exits 2.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import report, timing
from zoo import registry

_QUICK = flags.DEFINE_bool("quick", False, "Checks only, at small sizes, "
                           "Pallas kernels in interpret mode (any device).")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768"],
                             "Sequence lengths timed.")
_OPS = flags.DEFINE_list(
    "ops", ["splash(implementation='flash')",
            "splash(implementation='cudnn')", "xla", "blockwise"],
    "Attention specs timed.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per point.")
_MEMORY_LIMIT = flags.DEFINE_float(
    "memory_limit_gib", 100.0, "Points whose compiled program needs more "
    "are skipped.")
_OUT = flags.DEFINE_string("out", "", "Output folder (default "
                           "experiments/results/kernels_gpu).")

# (length, heads, kv heads, head_dim) of the checks: full and --quick.
CHECK_SHAPE = {False: (1024, 8, 2, 128), True: (128, 4, 2, 32)}
HEADS, KV_HEADS, HEAD_DIM = CHECK_SHAPE[False][1:]  # of the timings
# Worst absolute error accepted against the fp32 dense op (bf16 inputs and
# outputs; fp32 inputs on GPU may use TF32 matmuls).
TOLERANCE = {"bfloat16": 0.05, "float32": 0.01}


def _checks(quick: bool):
  """(spec, dtype, causal, padded) to check against the dense op."""
  interpret = ", interpret=True" if quick else ""
  flash = f"splash(implementation='flash'{interpret})"
  rows = [(flash, "float32", True, False), (flash, "bfloat16", False, False),
          ("splash(like='bigbird(block=32)')", "float32", True, True),
          ("splash(like='local(window=100)')", "bfloat16", True, True)]
  if not quick:
    rows += [(flash, "bfloat16", True, False), (flash, "float32", False,
                                                False)]
    rows += [("splash(implementation='cudnn')", "bfloat16", c, True)
             for c in (True, False)]
    rows += [("splash", "bfloat16", True, True), ("splash", "float32", True,
                                                  False)]
  return rows


def check(spec, dtype, causal, padded, shape):
  """Worst absolute error of outputs and of gradients against `standard`
  under the op's own pattern mask (per head), inputs rounded to `dtype`."""
  t, heads, kv_heads, head_dim = shape
  op = registry.build("attention", spec)
  ref = registry.build("attention", "standard")
  keys = jax.random.split(jax.random.key(0), 5)
  b = 2
  q = jax.random.normal(keys[0], (b, t, heads, head_dim), dtype)
  k, v = (jax.random.normal(key, (b, t, kv_heads, head_dim), dtype)
          for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  mask = (jax.random.uniform(keys[4], (b, t)) < 0.9) if padded else None
  allowed_HxTxT = np.asarray(op.pattern_mask(t, causal, heads))
  r = heads // kv_heads

  def dense(q, k, v):
    valid_BxT = jnp.ones((b, t), bool) if mask is None else mask
    head = lambda x, h: x[:, :, h:h + 1]
    return jnp.concatenate([
        ref(head(q, h), head(k, h // r), head(v, h // r),
            mask=allowed_HxTxT[h][None] & valid_BxT[:, None, :])
        for h in range(heads)], axis=2)

  def outputs_and_grads(f, *qkv):
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent)
    return f(*qkv), jax.grad(loss, argnums=(0, 1, 2))(*qkv)

  got, got_grads = jax.jit(lambda *a: outputs_and_grads(
      lambda *x: op(*x, causal=causal, mask=mask), *a))(q, k, v)
  want, want_grads = jax.jit(lambda *a: outputs_and_grads(dense, *a))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  err = lambda a, b: float(jnp.abs(a.astype(jnp.float32) - b).max())
  return {"op": spec, "dtype": dtype, "causal": causal, "padded": padded,
          "length": t, "out_error": err(got, want),
          "grad_error": max(err(a, b) for a, b in zip(got_grads, want_grads))}


def measure(spec, t, repeats, limit_gib):
  """Causal forward and forward+backward seconds (bf16, batch 1); None where
  the compiled program needs more than `limit_gib`."""
  op = registry.build("attention", spec)
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (1, t, HEADS, HEAD_DIM), jnp.bfloat16)
  k, v = (jax.random.normal(key, (1, t, KV_HEADS, HEAD_DIM), jnp.bfloat16)
          for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  forward = jax.jit(lambda q, k, v: op(q, k, v, causal=True))
  both = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(
      op(q, k, v, causal=True), cotangent).astype(jnp.float32),
                          argnums=(0, 1, 2)))
  row = {"op": spec, "length": t}
  for name, fn in (("forward", forward), ("forward_backward", both)):
    compiled = fn.lower(q, k, v).compile()
    need = timing.peak_bytes(compiled)
    row[f"{name}_gib"] = need / 2**30
    row[f"{name}_s"] = (None if need > limit_gib * 2**30 else
                        timing.median_seconds(compiled, (q, k, v), repeats))
  return row


def main(argv):
  del argv
  platform = jax.default_backend()
  quick = _QUICK.value
  if platform != "gpu" and not quick:
    print(f"kernels_gpu needs a GPU; this machine has {platform}; use "
          "--quick for an interpret-mode check", file=sys.stderr)
    sys.exit(2)
  checks = [check(*row, CHECK_SHAPE[quick]) for row in _checks(quick)]
  for row in checks:
    row["ok"] = max(row["out_error"], row["grad_error"]) <= TOLERANCE[
        row["dtype"]]
    print(row, flush=True)
  timings = []
  if not quick:
    for spec in _OPS.value:
      for length in map(int, _LENGTHS.value):
        timings.append(measure(spec, length, _REPEATS.value,
                               _MEMORY_LIMIT.value))
        print(timings[-1], flush=True)
  _write(platform, quick, checks, timings)
  if not all(row["ok"] for row in checks):
    sys.exit(1)


def _write(platform, quick, checks, timings):
  device = jax.devices()[0].device_kind
  fmt = lambda x: "-" if x is None else x
  t, heads, kv_heads, head_dim = CHECK_SHAPE[quick]
  body = (f"Device: {device} ({platform}), jax {jax.__version__}."
          + (" Quick run: Pallas kernels in interpret mode." if quick else "")
          + "\n\n## Checks against the dense op\n\n"
          "Worst absolute error of outputs and gradients against `standard` "
          f"(fp32) under each op's own pattern mask; batch 2, length {t}, "
          f"{heads} heads, {kv_heads} kv heads, head_dim {head_dim}; the "
          "padding mask hides ~10% of keys.\n\n"
          + report.markdown_table(
              ["op", "dtype", "causal", "padded", "out error", "grad error",
               "ok"],
              [[r["op"], r["dtype"], r["causal"], r["padded"],
                r["out_error"], r["grad_error"], r["ok"]] for r in checks]))
  if timings:
    body += (f"\n\n## Causal time, bf16, batch 1, {HEADS} heads, {KV_HEADS} "
             f"kv heads, head_dim {HEAD_DIM}\n\n"
             "Median seconds; '-' = over --memory_limit_gib.\n\n"
             + report.markdown_table(
                 ["op", "length", "forward s", "fwd+bwd s", "fwd+bwd GiB"],
                 [[r["op"], r["length"], fmt(r["forward_s"]),
                   fmt(r["forward_backward_s"]), r["forward_backward_gib"]]
                  for r in timings]))
  report.write("kernels_gpu", "GPU attention kernels: checks and timings",
               body, {"device": device, "checks": checks,
                      "timings": timings}, _OUT.value)


if __name__ == "__main__":
  app.run(main)
