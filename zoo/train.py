"""Trainer: `python -m zoo.train --config=configs/NAME.py --workdir=DIR`.

`train_and_evaluate(config, workdir)` is the library entry point; `main` is a
thin absl shell around it that turns configuration errors into exit code 2.
The train step is `jax.jit` with shardings over a (data, fsdp, tensor) mesh;
one CPU is a mesh of one, a pod slice the same program. `train_step` and
`eval_step` are public (`make_train_step` binds the model's structure), so
experiments compile exactly what the trainer runs.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from zoo import (checkpoint, host_memory, layers, plan, sharding, supervise,
                 xla_flags)
from zoo.data import pipeline
from zoo.metrics import MetricsWriter, read as read_metrics
from zoo.plan import ConfigError


class NonFiniteError(RuntimeError):
  """Loss or gradients became NaN or infinite."""


def train_step(graphdef, state, batch, grad_accum_steps: int = 1):
  """One update of the train state `state` (model and optimizer, split by
  `graphdef`) on `batch`, made only when the loss and every gradient are
  finite; returns (state, metrics), the metrics carrying `finite` and, per
  parameter, whether its gradient was. With `grad_accum_steps` = k > 1
  the batch is taken as k micro-batches (rows i, i + k, ... of micro-batch
  i, so each keeps its share of every data-parallel shard), run one after
  another in a scan; their gradients and metrics, each weighted by its
  share of the batch's loss weights, make the same update as the whole
  batch at once."""
  model, optimizer = nnx.merge(graphdef, state)
  layers.set_training_step(model, optimizer.step[...])
  grads, loss, metrics = _gradients(model, batch, grad_accum_steps)
  with jax.named_scope("finite_check"):
    grads_finite = jnp.stack([jnp.isfinite(g).all()
                              for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(loss) & grads_finite.all()

  def update(state):
    model, optimizer = nnx.merge(graphdef, state)
    with jax.named_scope("optimizer"):
      optimizer.update(model, grads)
    # Evaluation and sampling from this state use the step it reached.
    layers.set_training_step(model, optimizer.step[...])
    return nnx.state((model, optimizer))

  # A branch, not a select over every leaf: the skipped update costs
  # nothing and the taken one no extra pass over the state.
  new_state = jax.lax.cond(finite, update, lambda state: state, state)
  metrics.update(grad_norm=optax.tree.norm(grads), finite=finite,
                 grads_finite=grads_finite)
  return new_state, metrics


def _gradients(model, batch, steps: int):
  """(grads, loss, metrics) of the model's loss on `batch`, in `steps`
  micro-batches (see train_step)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, micro):
    return nnx.merge(graphdef, params, rest).loss(micro)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return grads, loss, metrics
  micros = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // steps, steps, *x.shape[1:]
                          ).swapaxes(0, 1), batch)
  weight = lambda micro: (jnp.sum(micro["weights"]).astype(jnp.float32)
                          if "weights" in micro else
                          jnp.float32(jax.tree.leaves(micro)[0].shape[0]))
  total = jnp.maximum(sum(weight(jax.tree.map(lambda x: x[i], micros))
                          for i in range(steps)), 1.0)

  def add(carry, micro):
    (loss, metrics), grads = grad_fn(params, micro)
    share = weight(micro) / total
    return jax.tree.map(lambda c, x: c + share * x, carry,
                        (grads, loss, metrics)), None

  zeros = jax.tree.map(
      jnp.zeros_like, jax.eval_shape(
          lambda: (lambda out: (out[1], *out[0]))(grad_fn(
              params, jax.tree.map(lambda x: x[0], micros)))))
  (grads, loss, metrics), _ = jax.lax.scan(add, zeros, micros)
  return grads, loss, metrics


def make_train_step(graphdef, grad_accum_steps: int = 1):
  """`train_step` for states of `graphdef`: (state, batch) -> (state,
  metrics), ready for jax.jit."""
  return functools.partial(train_step, graphdef,
                           grad_accum_steps=grad_accum_steps)


def eval_step(graphdef, state, batch):
  """(metrics, total weight) of one eval batch: the metrics are means over
  its weighted positions or examples, the weight the sum of its `weights`
  (at the state's training step, which picks the draw of attention that
  redraws random features)."""
  model, _ = nnx.merge(graphdef, state)
  return model.loss(batch)[1], jnp.sum(batch["weights"])


def check_workdir(p: plan.Plan, workdir: str) -> None:
  """Refuses (ConfigError) a workdir whose checkpoints the planned model
  cannot hold; reads metadata only."""
  why = checkpoint.mismatch(os.path.join(workdir, "checkpoints"),
                            nnx.state(p.abstract_model))
  if why:
    raise ConfigError(f"workdir: {why}")


def train_and_evaluate(config, workdir: str,
                       planned: plan.Plan | None = None) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest readable
  checkpoint; returns the last logged metrics. `planned` is the config's
  `plan.resolve` when the caller has it (and has checked the workdir).

  SIGTERM saves a checkpoint at the next step (one step that all processes
  agree on) and returns. A non-finite loss or gradient raises NonFiniteError
  naming the step (or, with `config.skip_nonfinite`, skips that update and
  counts it). With several processes, a process that raises tells the
  others; they, and a process that loses a peer or cannot save within
  `config.peer_timeout_s` of SIGTERM, exit 1 with one line (see
  zoo.supervise.Watchdog).
  """
  p = planned
  if p is None:
    p = plan.resolve(config)
    check_workdir(p, workdir)
  watch = supervise.Watchdog(config.peer_timeout_s)
  try:
    return _train(config, workdir, p, watch)
  except BaseException as e:
    watch.fail(f"{type(e).__name__}: {supervise.first_line(e)}")
    raise
  finally:
    watch.close()


def _train(config, workdir: str, p: plan.Plan, watch) -> dict[str, float]:
  """train_and_evaluate's loop; `watch` says when SIGTERM asks to stop."""
  layout = sharding.Layout.from_config(config.mesh)
  sources = p.task.sources(config.data.dir or None)
  tx, schedule = plan.make_optimizer(config)
  s = plan.setup(p, layout, tx)
  batch_sharding = layout.batch_sharding()
  param_names = [jax.tree_util.keystr(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(
                     nnx.state(s.abstract_state, nnx.Param))[0]]

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=config.max_checkpoints_to_keep)
  train_iter = pipeline.train_iterator(sources["train"],
                                       global_batch=config.batch_size,
                                       seed=config.seed)
  with layout:
    state, start = ckpt.restore(s.abstract_state, train_iter)
    if state is None:
      state = jax.jit(lambda: nnx.state(s.create()),
                      out_shardings=s.state_shardings)()
    else:
      logging.info("resumed from step %d", start)
      finished = _met_early_stop(config, workdir, start)
      if finished is not None:
        logging.info("step %d met early_stop %s before: nothing to train",
                     start, config.early_stop)
        ckpt.close()
        return finished
    next_batch = lambda: sharding.global_batch(next(train_iter), batch_sharding)
    batch = next_batch()
    step_fn = jax.jit(make_train_step(s.graphdef, config.grad_accum_steps),
                      donate_argnums=0, out_shardings=(s.state_shardings, None)
                      ).lower(state, batch).compile()
    flops = (step_fn.cost_analysis() or {}).get("flops", 0.0)
    eval_fn = jax.jit(functools.partial(eval_step, s.graphdef))
    log = _Logger(config, workdir, start, schedule, flops)
    in_flight = supervise.InFlight()
    try:
      for step in range(start, config.num_train_steps):
        state, metrics = step_fn(state, batch if step == start else next_batch())
        in_flight.add(metrics)
        done = step + 1
        log.add(done, metrics)
        last = done == config.num_train_steps
        if done % config.log_every_steps == 0 or last:
          log.check_finite(param_names, config.skip_nonfinite)
          scalars, began = {}, time.time()
          if done % config.eval_every_steps == 0 or last:
            scalars = {f"eval_{k}": v for k, v in evaluate(
                eval_fn, state, sources["eval"], config,
                batch_sharding).items()}
            if plan.early_stop_reached(config.early_stop, scalars):
              logging.info("step %d: early_stop %s met", done,
                           config.early_stop)
              last = True
            for name in sorted(sources) if last else ():
              if name.startswith("test"):  # test, and e.g. test_x2
                scalars.update({f"{name}_{k}": v for k, v in evaluate(
                    eval_fn, state, sources[name], config,
                    batch_sharding).items()})
          log.write(done, scalars, eval_s=time.time() - began)
        stop = watch.reached(done)
        if done % config.checkpoint_every_steps == 0 or last or stop:
          log.check_finite(param_names, config.skip_nonfinite)
          began = time.time()
          ckpt.save(done, state, train_iter)
          log.exclude(time.time() - began)
        if stop:
          logging.warning("preempted: saved step %d, exiting", done)
          break
        if last:
          break
    finally:
      ckpt.close()
      log.close()
  return log.last


def _met_early_stop(config, workdir: str, step: int) -> dict | None:
  """The metrics row written at `step` if its evaluation met
  `config.early_stop` (a run that ended early and is started again)."""
  if not config.early_stop or not os.path.exists(
      os.path.join(workdir, "metrics.jsonl")):
    return None
  rows = [r for r in read_metrics(workdir) if r["step"] == step]
  if rows and plan.early_stop_reached(config.early_stop, rows[-1]):
    return rows[-1]
  return None


class _Logger:
  """Averages step metrics over a logging window; writes them with
  throughput, learning rate and eval metrics; shows progress and ETA."""

  def __init__(self, config, workdir, start, schedule, flops_per_step):
    self.config, self.schedule, self.flops = config, schedule, flops_per_step
    self.writer = MetricsWriter(workdir, resume_step=start)
    self.window, self.start_time, self.last = [], time.time(), {}
    self.checked = 0  # window entries already checked for finiteness
    self.skipped = 0
    self.excluded = 0.0  # seconds of this window spent saving checkpoints

  def add(self, step, metrics):
    self.window.append((step, metrics))

  def exclude(self, seconds: float):
    """Leaves `seconds` (a checkpoint save) out of this window's
    throughput."""
    self.excluded += seconds

  def check_finite(self, param_names, skip: bool):
    """Raises at the first non-finite step in the window (or counts skips)."""
    unchecked, self.checked = self.window[self.checked:], len(self.window)
    for step, m in unchecked:
      if bool(m["finite"]):
        continue
      if skip:
        self.skipped += 1
        logging.warning("step %d: non-finite loss or gradient; update "
                        "skipped", step)
        continue
      if not np.isfinite(float(m["loss"])):
        what = "loss"
      else:
        bad = np.flatnonzero(~np.asarray(m["grads_finite"]))[0]
        what = f"gradient of {param_names[bad]}"
      raise NonFiniteError(f"step {step}: non-finite {what}; stopping (the "
                           "last checkpoint is kept)")

  def write(self, step, eval_scalars, eval_s: float):
    """Logs the window with `eval_scalars` (eval_* and test_* metrics); its
    `eval_s` seconds of evaluation (logged as eval_time_s) and the seconds
    given to `exclude` are left out of the throughput."""
    c = self.config
    rows = jax.device_get([m for _, m in self.window])
    rows = [r for r in rows if r["finite"]] or rows  # skipped steps left out
    keys = [k for k in rows[0] if k not in ("finite", "grads_finite")]
    scalars = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    steps_per_s = len(rows) / (
        time.time() - self.start_time - eval_s - self.excluded)
    scalars.update(
        learning_rate=float(self.schedule(step - 1)),
        tokens_per_s=steps_per_s * c.batch_size * c.data.seq_len,
        tflops_per_s=steps_per_s * self.flops * jax.device_count() / 1e12,
        skipped_updates=float(self.skipped))
    if c.peak_tflops_per_device > 0:
      scalars["mfu"] = scalars["tflops_per_s"] / (
          c.peak_tflops_per_device * jax.device_count())
    scalars.update(eval_scalars)
    if eval_scalars:
      scalars["eval_time_s"] = eval_s
    eta = (c.num_train_steps - step) / steps_per_s
    logging.info("step %d/%d  loss %.4f  %.0f tokens/s  ETA %.0fs%s", step,
                 c.num_train_steps, scalars["loss"], scalars["tokens_per_s"],
                 eta, "".join(f"  {k} {v:.4f}" for k, v in scalars.items()
                              if k.startswith(("eval_", "test_"))))
    self.writer.write(step, scalars)
    self.last = scalars
    self.window, self.checked, self.start_time = [], 0, time.time()
    self.excluded = 0.0

  def close(self):
    self.writer.close()


def evaluate(eval_fn, state, source, config, batch_sharding):
  """Metrics over every example of an eval split: each batch's means
  weighted by its total weight (a metric over part of the positions by
  that part's weight), the last batch being filled up with zero-weight
  copies (`pipeline.eval_batches`)."""
  in_flight, rows = supervise.InFlight(), []
  for b in pipeline.eval_batches(source, global_batch=config.batch_size):
    rows.append(in_flight.add(
        eval_fn(state, sharding.global_batch(b, batch_sharding))))
  rows = jax.device_get(rows)
  weights = np.array([w for _, w in rows])
  out = {}
  for key in rows[0][0]:
    # A metric over part of the positions, NAME_PART, comes with that
    # part's share of the weight, PART_fraction (see TransformerLM.loss).
    part = key.rsplit("_", 1)[-1]
    share = (np.array([m[f"{part}_fraction"] for m, _ in rows])
             if f"{part}_fraction" in rows[0][0] and not key.endswith(
                 "_fraction") else 1.0)
    w = weights * share
    out[key] = float(np.dot([m[key] for m, _ in rows], w)
                     / max(w.sum(), 1e-30))
  return out


def _define_flags():
  """Command-line flags; defined only when run as a program, so importing
  zoo.train (from experiments or user code) defines none."""
  config_flags.DEFINE_config_file("config", None, "Config file (Python, "
                                  "with get_config()).")
  flags.DEFINE_string("workdir", None, "Run directory (resumes from its "
                      "checkpoints).")
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 for "
      "multi-process runs; on TPU VMs leave unset and pass --num_processes=0 "
      "to let JAX discover the slice.")
  flags.DEFINE_integer("num_processes", 1, "Processes in the run; 0 = "
                       "discovered by JAX.")
  flags.DEFINE_integer("process_id", 0, "This process's index.")


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"config error: {e}", file=sys.stderr)
  except AttributeError as e:  # ml_collections: an override of no such key
    key = str(e).strip("\"'")
    print(f"config error: no config key {key!r}; see the config file for the "
          "valid keys", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  # Before jax starts its CPU backend (see zoo/host_memory.py and
  # zoo/xla_flags.py).
  xla_flags.apply()
  if note := host_memory.retain():
    logging.info("%s", note)
  logging.get_absl_handler().addFilter(checkpoint.quiet_orbax)
  f = flags.FLAGS
  if f.config is None or not f.workdir:
    print("config error: --config and --workdir are required", file=sys.stderr)
    sys.exit(2)
  timeout_s = f.config.peer_timeout_s
  if f.coordinator_address or f.num_processes != 1:
    # JAX's heartbeat check backs up supervise.Watchdog; it aborts with a
    # native stack dump rather than one line, so it gets twice the time.
    jax.distributed.initialize(
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes or None,
        process_id=f.process_id if f.coordinator_address else None,
        heartbeat_timeout_seconds=int(2 * timeout_s),
        shutdown_timeout_seconds=int(timeout_s))
  try:
    p = plan.resolve(f.config)
    check_workdir(p, f.workdir)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    train_and_evaluate(f.config, f.workdir, p)
  except (NonFiniteError, supervise.PeerError) as e:
    logging.error("%s", e)
    if jax.process_count() > 1:
      supervise.leave(1, timeout_s)
    sys.exit(1)
  except BaseException:
    if jax.process_count() == 1:
      raise
    logging.exception("this process failed; the others stop too")
    supervise.leave(1, timeout_s)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
