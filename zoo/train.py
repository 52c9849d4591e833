"""Trainer: `python -m zoo.train --config=configs/NAME.py --workdir=DIR`.

`train_and_evaluate(config, workdir)` is the library entry point; `main` is a
thin absl shell around it that turns configuration errors into exit code 2.
The train step is `jax.jit` with shardings over a (data, fsdp, tensor) mesh;
one CPU is a mesh of one, a pod slice the same program.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from zoo import registry, sharding
from zoo.checkpoint import Checkpointer
from zoo.data import pipeline
from zoo.metrics import MetricsWriter

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration the trainer refuses before any compute or file write."""


@dataclasses.dataclass
class Plan:
  """What a validated config resolves to."""

  task: Any
  model_fn: Any  # () -> nnx.Module
  mesh_shape: tuple[int, ...]


def _dtype(key: str, value: str):
  if value not in _DTYPES:
    raise ConfigError(f"{key}={value!r}; valid: {', '.join(_DTYPES)}")
  return _DTYPES[value]


def plan(config) -> Plan:
  """Checks the whole config and resolves its parts; raises ConfigError
  naming the key and the valid values. Computes and writes nothing."""
  m = config.model
  try:
    task = registry.build("task", config.data.task, seq_len=config.data.seq_len)
  except ValueError as e:
    raise ConfigError(f"data.task: {e}") from None
  for key in ("attention", "position"):
    try:
      registry.validate(key, m[key])
    except ValueError as e:
      raise ConfigError(f"model.{key}: {e}") from None
  for key in ("num_layers", "num_heads", "num_kv_heads", "embed_dim",
              "mlp_dim"):
    if m[key] < 1:
      raise ConfigError(f"model.{key}={m[key]} must be >= 1")
  for key in ("num_train_steps", "batch_size", "log_every_steps",
              "eval_every_steps", "checkpoint_every_steps"):
    if config[key] < 1:
      raise ConfigError(f"{key}={config[key]} must be >= 1")
  dtype = _dtype("model.dtype", m.dtype)
  param_dtype = _dtype("model.param_dtype", m.param_dtype)
  model_cls = registry.get("model", task.model)

  def model_fn():
    return model_cls(
        **task.model_args, seq_len=config.data.seq_len,
        attention=m.attention, position=m.position, num_layers=m.num_layers,
        embed_dim=m.embed_dim, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, mlp_dim=m.mlp_dim,
        rngs=nnx.Rngs(config.seed), dtype=dtype, param_dtype=param_dtype)

  try:
    nnx.eval_shape(model_fn)  # shapes only: catches incompatible parts
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None
  try:
    shape = sharding.mesh_shape(dict(config.mesh), jax.device_count())
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  data_parallel = shape[0] * shape[1]
  if config.batch_size % data_parallel or config.batch_size % jax.process_count():
    raise ConfigError(
        f"batch_size={config.batch_size} must be divisible by mesh.data * "
        f"mesh.fsdp = {data_parallel} and by the {jax.process_count()} "
        "processes")
  return Plan(task=task, model_fn=model_fn, mesh_shape=shape)


def make_optimizer(config) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup and cosine decay, global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps,
      max(config.num_train_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=config.weight_decay))
  return tx, schedule


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
  rows = jax.device_get(rows)
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.
  Returns the last logged metrics."""
  p = plan(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  axis_rules = sharding.rules()
  data_dir = config.data.dir or None
  sources = p.task.sources(data_dir)
  tx, schedule = make_optimizer(config)

  def create():
    model = p.model_fn()
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
  state_shardings = sharding.state_shardings(abstract_state, mesh, axis_rules)
  batch_sharding = sharding.batch_sharding(mesh, axis_rules)

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)
    (_, metrics), grads = grad_fn(model)
    optimizer.update(model, grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return nnx.state((model, optimizer)), metrics

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return model.loss(batch)[1]

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      every=config.checkpoint_every_steps,
                      max_to_keep=config.max_checkpoints_to_keep)
  train_iter = pipeline.train_iterator(sources["train"],
                                       global_batch=config.batch_size,
                                       seed=config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    abstract_pure = nnx.to_pure_dict(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, state_shardings))
    restored, start = ckpt.restore(abstract_pure, train_iter)
    if restored is None:
      state = jax.jit(lambda: nnx.state(create()),
                      out_shardings=state_shardings)()
    else:
      state = abstract_state
      nnx.replace_by_pure_dict(state, restored)
      logging.info("resumed from step %d", start)

    first = sharding.global_batch(next(train_iter), batch_sharding)
    step_fn = jax.jit(train_step, donate_argnums=0,
                      out_shardings=(state_shardings, None)
                      ).lower(state, first).compile()
    eval_fn = jax.jit(eval_step)
    flops = (step_fn.cost_analysis() or {}).get("flops", 0.0)
    writer = MetricsWriter(workdir, resume_step=start)
    tokens_per_step = config.batch_size * config.data.seq_len
    window, last = [], {}
    t0, window_start, batch = time.time(), time.time(), first
    try:
      for step in range(start, config.num_train_steps):
        if batch is None:
          batch = sharding.global_batch(next(train_iter), batch_sharding)
        state, metrics = step_fn(state, batch)
        batch = None
        window.append(metrics)
        done = step + 1
        if done % config.log_every_steps == 0 or done == config.num_train_steps:
          scalars = _mean_metrics(window)
          elapsed = time.time() - window_start
          steps_per_s = len(window) / elapsed
          scalars.update(
              learning_rate=float(schedule(step)),
              tokens_per_s=steps_per_s * tokens_per_step,
              tflops_per_s=steps_per_s * flops * jax.device_count() / 1e12)
          if config.peak_tflops_per_device > 0:
            scalars["mfu"] = scalars["tflops_per_s"] / (
                config.peak_tflops_per_device * jax.device_count())
          eta = (config.num_train_steps - done) / steps_per_s
          logging.info("step %d/%d  loss %.4f  %.0f tokens/s  ETA %.0fs", done,
                       config.num_train_steps, scalars["loss"],
                       scalars["tokens_per_s"], eta)
          if done % config.eval_every_steps == 0 or done == config.num_train_steps:
            scalars.update(evaluate(eval_fn, state, sources["eval"], config,
                                    batch_sharding))
            logging.info("step %d  eval %s", done, {
                k: round(v, 4) for k, v in scalars.items() if k.startswith("eval")})
          writer.write(done, scalars)
          last = scalars
          window, window_start = [], time.time()
        ckpt.save(done, nnx.to_pure_dict(state), train_iter,
                  force=done == config.num_train_steps)
    finally:
      ckpt.close()
      writer.close()
  logging.info("finished %d steps in %.1fs", config.num_train_steps,
               time.time() - t0)
  return last


def evaluate(eval_fn, state, source, config, batch_sharding):
  """Mean metrics over the eval split, keys prefixed with "eval_"."""
  rows = [eval_fn(state, sharding.global_batch(b, batch_sharding))
          for b in pipeline.eval_batches(source, global_batch=config.batch_size)]
  if not rows:
    raise ValueError(f"the eval split has fewer examples than batch_size="
                     f"{config.batch_size}")
  return {f"eval_{k}": v for k, v in _mean_metrics(rows).items()}


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file "
                                          "(Python, with get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumes "
                               "from its checkpoints).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process "
    "runs; on TPU VMs leave unset and pass --num_processes=0 to let JAX "
    "discover the slice.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the "
                                      "run; 0 = discovered by JAX.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO lines from the console (warnings stay)."""
  return record.levelno > 20 or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if _CONFIG.value is None or not _WORKDIR.value:
    print("config error: --config and --workdir are required", file=sys.stderr)
    sys.exit(2)
  if _COORDINATOR.value or _NUM_PROCESSES.value != 1:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value or None,
        process_id=_PROCESS_ID.value if _COORDINATOR.value else None)
  try:
    plan(_CONFIG.value)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
