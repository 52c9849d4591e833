"""What a run's config resolves to, checked before anything is computed or
written: the task, the model config and constructor, the optimizer, and the
train state's structure placed on a layout. The trainer, the checkpoint
restorer, the sweep harness and the benchmarks all start here.
"""

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from zoo import layers, registry, sharding


class ConfigError(ValueError):
  """A configuration the trainer refuses before any compute or file write."""


@dataclasses.dataclass
class Plan:
  """What a validated config resolves to."""

  task: Any
  model_config: layers.ModelConfig
  model_fn: Any  # () -> nnx.Module
  abstract_model: Any  # nnx.eval_shape(model_fn)


def resolve(config) -> Plan:
  """Checks the whole config and resolves its parts; raises ConfigError
  naming the key and the valid values. Computes and writes nothing."""
  m = config.model
  try:
    task = registry.build("task", config.data.task, seq_len=config.data.seq_len)
  except ValueError as e:
    raise ConfigError(f"data.task: {e}") from None
  try:
    for spec in layers.stack_specs(m.attention):
      registry.build("attention", spec)  # checks argument values too
  except ValueError as e:
    raise ConfigError(f"model.attention: {e}") from None
  try:
    registry.validate("position", m.position)
  except ValueError as e:
    raise ConfigError(f"model.position: {e}") from None
  try:
    model_config = layers.ModelConfig.from_config(config, **task.model_args)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for key in ("num_train_steps", "batch_size", "log_every_steps",
              "eval_every_steps", "checkpoint_every_steps", "peer_timeout_s"):
    if config[key] < 1:
      raise ConfigError(f"{key}={config[key]} must be >= 1")
  try:
    parse_early_stop(config.early_stop)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.lr_schedule not in SCHEDULES:
    raise ConfigError(f"lr_schedule={config.lr_schedule!r}; valid: "
                      f"{', '.join(SCHEDULES)}")
  model_cls = registry.get("model", task.model)

  def model_fn():
    return model_cls(model_config, rngs=nnx.Rngs(config.seed))

  try:
    abstract_model = nnx.eval_shape(model_fn)  # catches incompatible parts
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None
  try:
    shape = sharding.mesh_shape(dict(config.mesh), jax.device_count())
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  data_parallel = shape[0] * shape[1]
  if config.data.seq_len % shape[2]:
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be divisible "
                      f"by mesh.sequence={shape[2]}")
  if config.batch_size % data_parallel or config.batch_size % jax.process_count():
    raise ConfigError(
        f"batch_size={config.batch_size} must be divisible by mesh.data * "
        f"mesh.fsdp = {data_parallel} and by the {jax.process_count()} "
        "processes")
  accum = config.grad_accum_steps
  if accum < 1 or config.batch_size % (accum * data_parallel):
    raise ConfigError(
        f"grad_accum_steps={accum} must be >= 1 and divide batch_size="
        f"{config.batch_size} into micro-batches divisible by mesh.data * "
        f"mesh.fsdp = {data_parallel}")
  try:
    sharding.parse_rules(config.mesh.rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return Plan(task=task, model_config=model_config, model_fn=model_fn,
              abstract_model=abstract_model)


def parse_early_stop(rule: str) -> tuple[str, str, float] | None:
  """`"eval_accuracy>=0.99"` -> ("eval_accuracy", ">=", 0.99); "" -> None."""
  if not rule:
    return None
  for op in (">=", "<="):
    metric, sep, value = rule.partition(op)
    if sep:
      try:
        threshold = float(value)
      except ValueError:
        break
      if metric.startswith("eval_") and metric[5:].isidentifier():
        return metric, op, threshold
  raise ValueError(f"early_stop={rule!r}; valid: '' or 'eval_METRIC>=X' or "
                   "'eval_METRIC<=X' (e.g. 'eval_accuracy>=0.99')")


def early_stop_reached(rule: str, scalars: dict[str, float]) -> bool:
  """Whether an evaluation's `scalars` meet `config.early_stop`."""
  parsed = parse_early_stop(rule)
  if parsed is None or parsed[0] not in scalars:
    return False
  metric, op, threshold = parsed
  value = scalars[metric]
  return value >= threshold if op == ">=" else value <= threshold


# Learning rate after the linear warmup: cosine decay to a tenth of the
# peak at num_train_steps, or constant (so that every step of one run is a
# point of the same recipe, as scaling-law fits over training tokens need).
SCHEDULES = ("cosine", "constant")


def make_optimizer(config) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup then `config.lr_schedule`, global-norm
  clipping."""
  if config.lr_schedule == "constant":
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
        optax.constant_schedule(config.learning_rate)], [config.warmup_steps])
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps,
        max(config.num_train_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=config.weight_decay))
  return tx, schedule


@dataclasses.dataclass
class Setup:
  """The train state's structure and placement on a layout's mesh."""

  graphdef: Any
  abstract_state: Any  # nnx.State of jax.ShapeDtypeStruct with shardings
  state_shardings: Any
  create: Any  # () -> (model, optimizer)


def setup(p: Plan, layout: sharding.Layout, tx) -> Setup:
  """Model and optimizer structure, sharded by the layout's rules."""

  def create():
    model = p.model_fn()
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
  shardings = layout.state_shardings(abstract_state)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  return Setup(graphdef, abstract_state, shardings, create)
