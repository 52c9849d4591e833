"""Train-step speed of the zoo LM beside the same model in PyTorch eager,
and where each one's time goes.

  python -m experiments.step_throughput --torch            # needs torch
  python -m experiments.step_throughput --torch --profile
  python -m experiments.step_throughput --quick            # smoke test

The model: configs/text.py with vocabulary 256 (bytes), width 256, 4
layers, 4 heads, MLP 1024, length 512, batch 8, AdamW. zoo runs the
trainer's compiled train step (donated state, clipping, finiteness check:
what `zoo.train` runs); torch runs the same shapes written here: embedding
plus sinusoidal positions, pre-norm blocks of RMSNorm, bias-free q/k/v/o
projections with F.scaled_dot_product_attention (causal), tanh-GELU MLP,
final RMSNorm, untied head, cross-entropy, global-norm clipping and
torch.optim.AdamW at the trainer's rate and weight decay, on every core
(torch.set_num_threads). Each time is the median of --repeats runs after
--warmup; ratios are of the same run. Also reported: the train step's
compile time (first lower + compile, no persistent cache), and forward and
forward+backward alone, and page faults per train step: like the trainer,
the benchmark keeps freed host memory for reuse (zoo/host_memory.py), so a
warm step should fault in no new pages (--noretain_host_memory measures
glibc's default).

--profile adds where one train step's time goes (of the first --attention):
for zoo, jax's profiler trace of XLA:CPU's thunks, each attributed by its
instruction's op_name (from the compiled HLO) to a part of the model and to
forward, backward or optimizer; for torch, torch.profiler's per-operator
table.
"""

import collections
import glob
import gzip
import json
import os
import re
import resource
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from configs import text
from experiments import lm_step, report
from zoo import host_memory, xla_flags

# (layers, width, heads, mlp, length, batch)
SHAPES = {False: (4, 256, 4, 1024, 512, 8), True: (1, 32, 2, 64, 64, 2)}
VOCAB = lm_step.VOCAB


def make_config(quick: bool, attention: str = "standard"):
  layers, width, heads, mlp, length, batch = SHAPES[quick]
  config = text.get_config()
  m = config.model
  m.attention = attention
  m.num_layers, m.embed_dim, m.mlp_dim = layers, width, mlp
  m.num_heads = m.num_kv_heads = heads
  config.data.seq_len, config.batch_size = length, batch
  config.mesh.data = 1
  return config


def _page_faults(fn, calls: int = 3) -> float:
  """Minor page faults of the process per call of fn (warm)."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    fn()
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _median(fn, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


class ZooModel:
  """The trainer's compiled step, and forward / forward+backward, of the
  config's LM on one random byte batch."""

  def __init__(self, config):
    self.config = config
    self.lm = lm_step.build(config)
    self.batch = self.lm.batch
    graphdef = self.lm.setup.graphdef
    with self._context():
      start = time.perf_counter()
      self.step = self.lm.compile_step(donate=True)
      self.compile_s = time.perf_counter() - start
      self.state = self.lm.init_state()

      model = lambda state: nnx.merge(graphdef, state)[0]
      self.forward = jax.jit(lambda st, b: model(st).loss(b)[0])
      self.backward = jax.jit(lambda st, b: nnx.grad(
          lambda mdl: mdl.loss(b)[0])(model(st)))

  def _context(self):
    return self.lm.context()

  def train_step(self):
    with self._context():
      self.state, metrics = self.step(self.state, self.batch)
      jax.block_until_ready(metrics)

  def forward_only(self):
    with self._context():
      jax.block_until_ready(self.forward(self.state, self.batch))

  def forward_backward(self):
    with self._context():
      jax.block_until_ready(self.backward(self.state, self.batch))

  def profile(self, steps: int = 3) -> dict[str, float]:
    """Seconds per step by part (see `part_of`), from a profiler trace of
    `steps` train steps."""
    names = op_names(self.step.as_text())
    folder = tempfile.mkdtemp()
    try:
      with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(steps):
          self.train_step()
      (path,) = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"),
                          recursive=True)
      with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    finally:
      shutil.rmtree(folder)
    parts = collections.Counter()
    for e in events:
      op = (e.get("args") or {}).get("hlo_op")
      if e.get("ph") == "X" and op:
        parts[part_of(names.get(op, ""), op)] += e["dur"] * 1e-6 / steps
    return dict(parts)


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name metadata of a compiled module's text. A
  fusion takes the op_names of the instructions inside it (joined), so
  a fused matmul is known by its dot."""
  computations, instructions, current = {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
    if head:
      current = head.group(1)
      computations[current] = []
      continue
    inst = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if inst and current is not None:
      op_name = re.search(r'op_name="([^"]*)"', line)
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      instructions[inst.group(1)] = (op_name.group(1) if op_name else "",
                                     calls.group(1) if calls else None)
      computations[current].append(inst.group(1))
  out = {}
  for name, (op_name, calls) in instructions.items():
    inner = [instructions[i][0] for i in computations.get(calls, [])]
    out[name] = " | ".join(x for x in [op_name] + inner if x)
  return out


# Parts of the model by the jax.named_scope the model code puts around
# them (zoo/layers.py, zoo/models/transformer.py, zoo/train.py).
PARTS = [("attention op", "attention_op"),
         ("q/k/v and out projections", "qkv_projection|out_projection"),
         ("MLP matmuls", "mlp_up|mlp_down"), ("GELU", "gelu"),
         ("norms", "norm"), ("embedding and positions", "embedding"),
         ("head and loss", "head|loss"),
         ("optimizer (AdamW, clipping)", "optimizer"),
         ("finiteness check and guarded update", "finite_check")]
OTHER = "other (residual adds, copies, layout)"


def part_of(op_names_joined: str, instruction: str) -> str:
  """`phase: part` of an instruction, by the first of its op_names (its
  own, then those fused into it) that names a part; phase is backward
  under a transpose (the VJP), forward otherwise; the optimizer has
  none."""
  for name in op_names_joined.split(" | "):
    part = next((p for p, pattern in PARTS if re.search(pattern, name)),
                None)
    if part:
      break
  else:
    part, name = OTHER, op_names_joined or instruction
  if part.startswith(("optimizer", "finiteness")):
    return part
  return f"{'backward' if 'transpose(' in name else 'forward'}: {part}"


def torch_model(config):
  """The same model in PyTorch eager: (train step, forward, forward +
  backward, profile) closures."""
  import torch  # optional, only with --torch
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  m = config.model
  d, h, t, b = m.embed_dim, m.num_heads, config.data.seq_len, config.batch_size

  class Block(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)
      self.qkv = torch.nn.ModuleList(
          [torch.nn.Linear(d, d, bias=False) for _ in range(3)])
      self.out = torch.nn.Linear(d, d, bias=False)
      self.up = torch.nn.Linear(d, m.mlp_dim, bias=False)
      self.down = torch.nn.Linear(m.mlp_dim, d, bias=False)

    def forward(self, x_BxTxD):
      y = self.norm1(x_BxTxD)
      q, k, v = (p(y).view(b, t, h, d // h).transpose(1, 2)
                 for p in self.qkv)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x_BxTxD = x_BxTxD + self.out(a.transpose(1, 2).reshape(b, t, d))
      y = F.gelu(self.up(self.norm2(x_BxTxD)), approximate="tanh")
      return x_BxTxD + self.down(y)

  class LM(torch.nn.Module):

    def __init__(self):
      super().__init__()
      from zoo.position.absolute import sinusoid_table
      self.embed = torch.nn.Embedding(VOCAB, d)
      self.register_buffer("positions", torch.from_numpy(
          sinusoid_table(t, d, 10000.0)))
      self.blocks = torch.nn.ModuleList([Block()
                                         for _ in range(m.num_layers)])
      self.norm = torch.nn.RMSNorm(d)
      self.head = torch.nn.Linear(d, VOCAB, bias=False)

    def forward(self, tokens, targets):
      x_BxTxD = self.embed(tokens) + self.positions
      for block in self.blocks:
        x_BxTxD = block(x_BxTxD)
      logits = self.head(self.norm(x_BxTxD))
      return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))

  model = LM()
  opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                          weight_decay=config.weight_decay)
  tokens = torch.randint(0, VOCAB, (b, t + 1))
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

  def train_step():
    opt.zero_grad(set_to_none=True)
    model(inputs, targets).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    opt.step()

  def forward_only():
    with torch.no_grad():
      model(inputs, targets)

  def forward_backward():
    model.zero_grad(set_to_none=True)
    model(inputs, targets).backward()

  def profile(steps: int = 3) -> str:
    with torch.profiler.profile() as prof:
      for _ in range(steps):
        train_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total",
                                     row_limit=20)

  return train_step, forward_only, forward_backward, profile


def main(argv):
  del argv
  f = flags.FLAGS
  # As the trainer runs (see zoo/xla_flags.py and zoo/host_memory.py).
  xla_flags.apply()
  memory = ((host_memory.retain() or "host memory retained")
            if f.retain_host_memory else "host memory: glibc default")
  quick = f.quick
  repeats, warmup = (2, 1) if quick else (f.repeats, f.warmup)
  zoo_models = {f"zoo {spec}": ZooModel(make_config(quick, spec))
                for spec in f.attention}
  zoo_model = next(iter(zoo_models.values()))
  config = zoo_model.config
  tokens = config.batch_size * config.data.seq_len
  runs = {name: (m.train_step, m.forward_only, m.forward_backward)
          for name, m in zoo_models.items()}
  torch_profile = None
  if f.torch:
    *fns, torch_profile = torch_model(config)
    runs["torch eager"] = tuple(fns)
  rows = []
  for name, (step, forward, backward) in runs.items():
    step_s = _median(step, warmup, repeats)
    rows.append({"framework": name, "train_step_s": step_s,
                 "tokens_per_s": tokens / step_s,
                 "forward_s": _median(forward, warmup, repeats),
                 "forward_backward_s": _median(backward, warmup, repeats),
                 "page_faults_per_step": _page_faults(step)})
  for row, model in zip(rows, zoo_models.values()):
    row["compile_s"] = model.compile_s
  table = report.markdown_table(
      ["framework", "train tokens/s", "train step s", "forward s",
       "forward+backward s", "compile s", "page faults per step"],
      [[r["framework"], r["tokens_per_s"], r["train_step_s"], r["forward_s"],
        r["forward_backward_s"], r.get("compile_s", "-"),
        r["page_faults_per_step"]] for r in rows])
  layers, width, heads, mlp, length, batch = SHAPES[quick]
  parts = [
      f"Device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; "
      f"jax {jax.__version__}. Model: {layers} layers, width {width}, "
      f"{heads} heads, MLP {mlp}, vocabulary {VOCAB}, length {length}, "
      f"batch {batch} ({tokens} tokens per step); medians of {repeats} "
      f"runs after {warmup} warm-up runs; {memory}.", table]
  if f.torch:
    parts.append("Speed of zoo / speed of torch:\n\n" + "\n".join(
        f"- {r['framework']}: " + ", ".join(
            f"{k} {rows[-1][k] / r[k]:.2f}x" for k in (
                "train_step_s", "forward_s", "forward_backward_s"))
        for r in rows[:-1]))
  raw = {"rows": rows}
  if f.profile:
    breakdown = zoo_model.profile()
    total = sum(breakdown.values())
    parts.append(f"## Where zoo's train step goes ({f.attention[0]})\n\n"
                 "XLA:CPU thunk time per step from jax's profiler trace "
                 "(summed over threads, so it can exceed the wall time; a "
                 "custom call counts its calling thread only), by part:\n\n"
                 + report.markdown_table(
                     ["part", "seconds per step", "share"],
                     [[k, v, f"{100 * v / total:.1f}%"] for k, v in sorted(
                         breakdown.items(), key=lambda kv: -kv[1])]))
    raw["zoo_profile"] = breakdown
    if torch_profile:
      table = torch_profile()
      parts.append("## Where torch's train step goes\n\ntorch.profiler, "
                   "3 steps, by operator:\n\n```\n" + table + "\n```")
      raw["torch_profile"] = table
  parts.insert(2, "![step](step_throughput.png)")
  folder = report.write("step_throughput", "Train step: zoo beside "
                        "PyTorch eager", "\n\n".join(parts), raw, f.out)
  _plot(os.path.join(folder, "step_throughput.png"), rows,
        raw.get("zoo_profile"))


def _plot(path: str, rows: list[dict], breakdown: dict | None):
  """Step, forward and forward+backward seconds per framework; zoo's step
  by part when profiled."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2 if breakdown else 1, figsize=(
      13 if breakdown else 5, 4.5), squeeze=False)
  keys = ["train_step_s", "forward_backward_s", "forward_s"]
  pos = np.arange(len(keys))
  width = 0.8 / len(rows)
  for i, r in enumerate(rows):
    axes[0, 0].bar(pos + width * i, [r[k] for k in keys], width,
                   label=r["framework"])
  axes[0, 0].set_xticks(pos + 0.4 - width / 2,
                        ["train step", "fwd+bwd", "forward"])
  axes[0, 0].set(ylabel="seconds (median)", title="Step time")
  axes[0, 0].legend()
  if breakdown:
    parts = sorted(breakdown, key=breakdown.get)
    axes[0, 1].barh(parts, [breakdown[p] for p in parts])
    axes[0, 1].tick_params(axis="y", labelsize=7)
    axes[0, 1].set(xlabel="thunk seconds per step",
                   title="zoo train step by part")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _define_flags():
  """Flags; defined only when run as a program, so importing this module
  (tests, other benchmarks) defines none."""
  flags.DEFINE_bool("torch", False, "Also time the PyTorch model.")
  flags.DEFINE_multi_string("attention", ["standard"], "Attention spec of "
                            "the zoo model; repeat the flag for a row each "
                            "(the profile is of the first).")
  flags.DEFINE_bool("profile", False, "Break one step's time down by model "
                    "part.")
  flags.DEFINE_integer("repeats", 10, "Timed runs per figure.")
  flags.DEFINE_integer("warmup", 3, "Untimed runs first.")
  flags.DEFINE_bool("quick", False, "Tiny model, 2 repeats.")
  flags.DEFINE_bool("retain_host_memory", True, "Keep freed host memory "
                    "for reuse, as the trainer does (zoo/host_memory.py); "
                    "false measures glibc's default.")
  flags.DEFINE_string("out", "", "Output folder (default "
                      "experiments/results/step_throughput).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
