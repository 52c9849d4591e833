"""Trainer: `python -m zoo.train --config=configs/NAME.py --workdir=DIR`.

`train_and_evaluate(config, workdir)` is the library entry point; `main` is a
thin absl shell around it that turns configuration errors into exit code 2.
The train step is `jax.jit` with shardings over a (data, fsdp, tensor) mesh;
one CPU is a mesh of one, a pod slice the same program.
"""

import collections
import dataclasses
import os
import select
import signal
import sys
import threading
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

from zoo import checkpoint, registry, sharding
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


def _dtype(key: str, value: str):
  if value not in _DTYPES:
    raise ConfigError(f"{key}={value!r}; valid: {', '.join(_DTYPES)}")
  return _DTYPES[value]


def plan(config, workdir: str | None = None) -> Plan:
  """Checks the whole config (and that `workdir`'s checkpoints, if any, fit
  its model) and resolves its parts; raises ConfigError naming the key and
  the valid values. Computes and writes nothing."""
  m = config.model
  try:
    task = registry.build("task", config.data.task, seq_len=config.data.seq_len)
  except ValueError as e:
    raise ConfigError(f"data.task: {e}") from None
  try:
    registry.build("attention", m.attention)  # checks argument values too
  except ValueError as e:
    raise ConfigError(f"model.attention: {e}") from None
  try:
    registry.validate("position", m.position)
  except ValueError as e:
    raise ConfigError(f"model.position: {e}") from None
  for key in ("num_layers", "num_heads", "num_kv_heads", "embed_dim",
              "mlp_dim"):
    if m[key] < 1:
      raise ConfigError(f"model.{key}={m[key]} must be >= 1")
  for key in ("num_train_steps", "batch_size", "log_every_steps",
              "eval_every_steps", "checkpoint_every_steps", "peer_timeout_s"):
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
    abstract_model = nnx.eval_shape(model_fn)  # catches incompatible parts
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None
  if workdir:
    why = checkpoint.mismatch(os.path.join(workdir, "checkpoints"),
                              nnx.state(abstract_model))
    if why:
      raise ConfigError(f"workdir: {why}")
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
  try:
    sharding.parse_rules(config.mesh.rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return Plan(task=task, model_fn=model_fn)


def make_optimizer(config) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup and cosine decay, global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps,
      max(config.num_train_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=config.weight_decay))
  return tx, schedule


@dataclasses.dataclass
class Setup:
  """The train state's structure and placement on the mesh."""

  graphdef: Any
  abstract_state: Any  # nnx.State of jax.ShapeDtypeStruct with shardings
  state_shardings: Any
  create: Any  # () -> (model, optimizer)


def setup(p: Plan, mesh, axis_rules, tx) -> Setup:
  """Model and optimizer structure, sharded by the logical axis rules."""

  def create():
    model = p.model_fn()
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
  shardings = sharding.state_shardings(abstract_state, mesh, axis_rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  return Setup(graphdef, abstract_state, shardings, create)


def restore_model(config, workdir: str):
  """The model of `workdir`'s newest readable checkpoint (e.g. to evaluate
  or sample), placed on a mesh built from `config`. Raises if there is
  none."""
  p = plan(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  axis_rules = sharding.parse_rules(config.mesh.rules)
  s = setup(p, mesh, axis_rules, make_optimizer(config)[0])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    state, step = ckpt.restore(s.abstract_state)
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}")
  return nnx.merge(s.graphdef, state)[0]


class NonFiniteError(RuntimeError):
  """Loss or gradients became NaN or infinite."""


def _make_train_step(graphdef):
  """A step that updates only when the loss and every gradient are finite;
  metrics carry `finite` and, per parameter, whether its gradient was."""

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    grad_fn = nnx.value_and_grad(lambda m: m.loss(batch, step), has_aux=True)
    old_leaves = jax.tree.leaves(state)  # arrays; merge shares Variables
    (loss, metrics), grads = grad_fn(model)
    grads_finite = jnp.stack([jnp.isfinite(g).all()
                              for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(loss) & grads_finite.all()
    optimizer.update(model, grads)
    new_leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
    new_state = jax.tree.unflatten(treedef, [
        jnp.where(finite, n, o) for n, o in zip(new_leaves, old_leaves)])
    metrics.update(grad_norm=optax.tree.norm(grads), finite=finite,
                   grads_finite=grads_finite)
    return new_state, metrics

  return train_step


def _eval_step(graphdef, state, batch):
  """Metrics of one eval batch at the state's training step (which picks
  the draw of attention that redraws random features)."""
  model, optimizer = nnx.merge(graphdef, state)
  return model.loss(batch, optimizer.step[...])[1]


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest readable
  checkpoint; returns the last logged metrics.

  SIGTERM saves a checkpoint at the next step (one step that all processes
  agree on) and returns. A non-finite loss or gradient raises NonFiniteError
  naming the step (or, with `config.skip_nonfinite`, skips that update and
  counts it). With several processes, a process that raises tells the
  others; they, and a process that loses a peer or cannot save within
  `config.peer_timeout_s` of SIGTERM, exit 1 with one line (see _Watchdog).
  """
  p = plan(config, workdir)
  watch = _Watchdog(config.peer_timeout_s)
  try:
    return _train(config, workdir, p, watch)
  except BaseException as e:
    watch.fail(f"{type(e).__name__}: {_first_line(e)}")
    raise
  finally:
    watch.close()


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [""])[0]


def _train(config, workdir: str, p: Plan, watch) -> dict[str, float]:
  """train_and_evaluate's loop; `watch` says when SIGTERM asks to stop."""
  mesh = sharding.make_mesh(dict(config.mesh))
  axis_rules = sharding.parse_rules(config.mesh.rules)
  sources = p.task.sources(config.data.dir or None)
  tx, schedule = make_optimizer(config)
  s = setup(p, mesh, axis_rules, tx)
  batch_sharding = sharding.batch_sharding(mesh, axis_rules)
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
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    state, start = ckpt.restore(s.abstract_state, train_iter)
    if state is None:
      state = jax.jit(lambda: nnx.state(s.create()),
                      out_shardings=s.state_shardings)()
    else:
      logging.info("resumed from step %d", start)
    next_batch = lambda: sharding.global_batch(next(train_iter), batch_sharding)
    batch = next_batch()
    step_fn = jax.jit(_make_train_step(s.graphdef),
                      donate_argnums=0, out_shardings=(s.state_shardings, None)
                      ).lower(state, batch).compile()
    flops = (step_fn.cost_analysis() or {}).get("flops", 0.0)
    eval_fn = jax.jit(lambda st, b: _eval_step(s.graphdef, st, b))
    log = _Logger(config, workdir, start, schedule, flops)
    in_flight = _InFlight()
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
            scalars = evaluate(eval_fn, state, sources["eval"], config,
                               batch_sharding)
          log.write(done, scalars, eval_s=time.time() - began)
        stop = watch.reached(done)
        if done % config.checkpoint_every_steps == 0 or last or stop:
          log.check_finite(param_names, config.skip_nonfinite)
          ckpt.save(done, state, train_iter)
        if stop:
          logging.warning("preempted: saved step %d, exiting", done)
          break
    finally:
      ckpt.close()
      log.close()
  return log.last


# Programs dispatched and not yet finished, at most (see _InFlight).
_MAX_IN_FLIGHT = 2


class _InFlight:
  """Waits for the oldest dispatched program once more than _MAX_IN_FLIGHT
  are unfinished.

  Dispatching without limit deadlocks multi-process CPU runs: XLA's CPU
  client admits 32 unfinished programs per device and makes the launch of
  the next one wait on a worker thread of the pool that also runs the
  devices' shares of a collective; once that wait holds the thread a queued
  gloo all-reduce needs, the all-reduce never completes, no slot frees, and
  every process waits for it forever. A bounded queue also keeps the host a
  step or two ahead on accelerators, which is all dispatch needs."""

  def __init__(self):
    self.pending = collections.deque()

  def add(self, outputs):
    self.pending.append(outputs)
    if len(self.pending) > _MAX_IN_FLIGHT:
      jax.block_until_ready(self.pending.popleft())
    return outputs


def _leave(code: int, timeout_s: float, lost=()):
  """Exits the process now, skipping interpreter shutdown (whose
  distributed barrier would wait for processes that have gone). Process 0
  hosts the key-value store that the others read, so it leaves last: it
  waits, at most `timeout_s`, for every other process but the `lost` ones to
  say it is leaving."""
  client = sharding.kv_client()
  try:
    if client is not None and jax.process_index():
      client.key_value_set(f"zoo/leaving/{jax.process_index()}", "")
    elif client is not None:
      deadline = time.monotonic() + timeout_s
      for j in sorted(set(range(1, jax.process_count())) - set(lost)):
        wait_ms = max(1, int(1000 * (deadline - time.monotonic())))
        client.blocking_key_value_get(f"zoo/leaving/{j}", wait_ms)
  except jax.errors.JaxRuntimeError:
    pass  # the store is gone, or a process did not answer: leave anyway
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


class _Watchdog:
  """Ends a run that cannot go on within `timeout_s`, from a thread, so it
  acts while the main thread is stuck in a collective, a compile or a wait.

  SIGTERM (what schedulers and TPU maintenance send) to any process asks
  all of them to stop: each publishes the last step it reached, and
  `reached` is true at the step after the largest, which every process can
  still reach, so they save the same step. A process that has not finished
  `timeout_s` after the request exits 1. A peer whose heartbeat stops for
  `timeout_s` (killed, host lost) or that reports a failure (`fail`) makes
  the others exit 1, with one line naming it. Processes talk through the
  jax.distributed key-value store, never through collectives, which cannot
  time out."""

  runs = 0  # instances so far; keys of one run do not meet another's

  def __init__(self, timeout_s: float):
    _Watchdog.runs += 1
    self.timeout_s = timeout_s
    self.interval = min(5.0, timeout_s / 10)  # between heartbeats
    self.client = sharding.kv_client()
    self.me, self.count = jax.process_index(), jax.process_count()
    self.prefix = f"zoo/run{_Watchdog.runs}/"
    self.step = -1  # the last step reached (written by the main thread)
    self.signalled = threading.Event()  # SIGTERM here
    self.requested = threading.Event()  # SIGTERM here or in a peer
    self.decided = threading.Event()  # stop_at is known
    self.stop_at = None
    self.deadline = None
    self.failed = False
    self.beat = 0
    self.seen = {}  # peer -> (its last heartbeat, when that changed)
    self.started = time.monotonic()
    self.closing = threading.Event()
    # SIGTERM's Python handler runs only when the main thread is back in
    # Python; the wakeup fd tells this thread at once.
    self.signals, wakeup = os.pipe()
    os.set_blocking(wakeup, False)
    self.previous_fd = signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
    self.previous_handler = signal.signal(
        signal.SIGTERM, lambda *_: self.signalled.set())
    self.wakeup = wakeup
    self.thread = threading.Thread(target=self._run, name="zoo-watchdog",
                                   daemon=True)
    self.thread.start()

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop; called after every step, in order."""
    self.step = step
    if not self.requested.is_set():
      return False
    self.decided.wait()  # bounded: the deadline ends the process
    return step >= self.stop_at

  def fail(self, why: str):
    """Tells the other processes that this one failed with `why`."""
    self.failed = True
    self._tell(f"failed/{self.me}", why)

  def close(self):
    self.closing.set()
    os.write(self.wakeup, b"\0")  # wakes the thread from its wait
    self.thread.join()
    self._tell(f"done/{self.me}", "")
    signal.set_wakeup_fd(self.previous_fd)
    # None: the handler was not set from Python (JAX's preemption notifier).
    signal.signal(signal.SIGTERM, self.previous_handler or signal.SIG_DFL)
    os.close(self.signals)
    os.close(self.wakeup)

  def _run(self):
    while not self.closing.is_set():
      # While processes are agreeing on a step, the main thread waits.
      pending = self.requested.is_set() and not self.decided.is_set()
      ready, _, _ = select.select([self.signals], [], [],
                                  0.05 if pending else self.interval)
      if ready and signal.SIGTERM in os.read(self.signals, 512):
        self.signalled.set()
      if self.signalled.is_set() and not self.requested.is_set():
        logging.warning("SIGTERM: saving at the next step all processes "
                        "reach, or exiting in %d s", self.timeout_s)
        self._request()
      if self.client is not None:
        try:
          self._poll()
        except jax.errors.JaxRuntimeError as e:
          self._exit(f"lost process 0 (it holds the coordination service): "
                     f"{_first_line(e)}", lost=[0])
      if self.deadline is not None and time.monotonic() > self.deadline:
        self._exit(f"SIGTERM: no checkpoint saved within {self.timeout_s} s; "
                   f"exiting (rerun resumes from the last saved step)")

  def _request(self):
    """Stops at a step every process can reach; see the class docstring."""
    if self.requested.is_set():
      return
    self.requested.set()
    self.deadline = time.monotonic() + self.timeout_s
    step = self.step  # read after `requested` is set: see `reached`
    if self.client is None:
      self.stop_at = step + 1
      self.decided.set()
      return
    self.client.key_value_set(f"{self.prefix}step/{self.me}", str(step))
    self.client.key_value_set(f"{self.prefix}stop", "", allow_overwrite=True)

  def _poll(self):
    """Beats, and reads the peers' beats, failures and stop requests."""
    p, now = self.prefix, time.monotonic()
    self.beat += 1
    self.client.key_value_set(f"{p}beat/{self.me}", str(self.beat),
                              allow_overwrite=True)
    entries = dict(self.client.key_value_dir_get(p))
    for j in range(self.count):
      why = entries.get(f"{p}failed/{j}")
      if why is not None and j != self.me and not self.failed:
        self._exit(f"process {j} failed: {why}")
    lost = []
    for j in range(self.count):
      if j == self.me or f"{p}done/{j}" in entries:
        continue
      beat = entries.get(f"{p}beat/{j}")
      last, since = self.seen.get(j, (None, self.started))
      if beat != last:
        self.seen[j] = (beat, now)
      elif now - since > self.timeout_s:
        lost.append(j)
    if lost:
      self._exit(f"lost process {lost[0]}: no heartbeat for "
                 f"{self.timeout_s} s; exiting", lost)
    if f"{p}stop" in entries:
      self._request()
    if self.requested.is_set() and not self.decided.is_set():
      steps = self.client.key_value_dir_get(f"{p}step/")
      if len(steps) == self.count:
        self.stop_at = max(int(step) for _, step in steps) + 1
        self.decided.set()

  def _tell(self, key: str, value: str):
    """Publishes a key of this run; a store already gone (process 0 lost)
    is no news to report over the error at hand."""
    if self.client is None:
      return
    try:
      self.client.key_value_set(self.prefix + key, value)
    except jax.errors.JaxRuntimeError:
      pass

  def _exit(self, line: str, lost=()):
    logging.error("%s", line)
    _leave(1, self.timeout_s, lost)


class _Logger:
  """Averages step metrics over a logging window; writes them with
  throughput, learning rate and eval metrics; shows progress and ETA."""

  def __init__(self, config, workdir, start, schedule, flops_per_step):
    self.config, self.schedule, self.flops = config, schedule, flops_per_step
    self.writer = MetricsWriter(workdir, resume_step=start)
    self.window, self.start_time, self.last = [], time.time(), {}
    self.checked = 0  # window entries already checked for finiteness
    self.skipped = 0

  def add(self, step, metrics):
    self.window.append((step, metrics))

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
    """Logs the window; its `eval_s` seconds of evaluation are left out of
    the throughput and logged as eval_time_s."""
    c = self.config
    rows = jax.device_get([m for _, m in self.window])
    rows = [r for r in rows if r["finite"]] or rows  # skipped steps left out
    keys = [k for k in rows[0] if k not in ("finite", "grads_finite")]
    scalars = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    steps_per_s = len(rows) / (time.time() - self.start_time - eval_s)
    scalars.update(
        learning_rate=float(self.schedule(step - 1)),
        tokens_per_s=steps_per_s * c.batch_size * c.data.seq_len,
        tflops_per_s=steps_per_s * self.flops * jax.device_count() / 1e12,
        skipped_updates=float(self.skipped))
    if c.peak_tflops_per_device > 0:
      scalars["mfu"] = scalars["tflops_per_s"] / (
          c.peak_tflops_per_device * jax.device_count())
    scalars.update({f"eval_{k}": v for k, v in eval_scalars.items()})
    if eval_scalars:
      scalars["eval_time_s"] = eval_s
    eta = (c.num_train_steps - step) / steps_per_s
    logging.info("step %d/%d  loss %.4f  %.0f tokens/s  ETA %.0fs%s", step,
                 c.num_train_steps, scalars["loss"], scalars["tokens_per_s"],
                 eta, "".join(f"  {k} {v:.4f}" for k, v in scalars.items()
                              if k.startswith("eval_")))
    self.writer.write(step, scalars)
    self.last = scalars
    self.window, self.checked, self.start_time = [], 0, time.time()

  def close(self):
    self.writer.close()


def evaluate(eval_fn, state, source, config, batch_sharding):
  """Mean metrics over the eval split."""
  in_flight, rows = _InFlight(), []
  for b in pipeline.eval_batches(source, global_batch=config.batch_size):
    rows.append(in_flight.add(
        eval_fn(state, sharding.global_batch(b, batch_sharding))))
  if not rows:
    raise ValueError(f"the eval split has fewer examples than batch_size="
                     f"{config.batch_size}")
  rows = jax.device_get(rows)
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


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


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO lines from the console (warnings stay)."""
  return record.levelno > 20 or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_orbax)
  f = flags.FLAGS
  if f.config is None or not f.workdir:
    print("config error: --config and --workdir are required", file=sys.stderr)
    sys.exit(2)
  timeout_s = f.config.peer_timeout_s
  if f.coordinator_address or f.num_processes != 1:
    # JAX's heartbeat check backs up _Watchdog's; it aborts with a native
    # stack dump rather than one line, so it gets twice the time.
    jax.distributed.initialize(
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes or None,
        process_id=f.process_id if f.coordinator_address else None,
        heartbeat_timeout_seconds=int(2 * timeout_s),
        shutdown_timeout_seconds=int(timeout_s))
  try:
    plan(f.config, f.workdir)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    train_and_evaluate(f.config, f.workdir)
  except (NonFiniteError, sharding.PeerError) as e:
    logging.error("%s", e)
    if jax.process_count() > 1:
      _leave(1, timeout_s)
    sys.exit(1)
  except BaseException:
    if jax.process_count() == 1:
      raise
    logging.exception("this process failed; the others stop too")
    _leave(1, timeout_s)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
