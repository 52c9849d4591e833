"""Logical axis names, their mapping to mesh axes, and the device mesh.

Parameters and activations are annotated with logical axes ("batch",
"length", "embed", "heads", "kv", "mlp", "vocab"); `config.mesh.rules`
maps each to mesh axes ("data", "fsdp", "tensor"), so data parallel, FSDP and
tensor parallel are config changes. Variables are created unsharded
(`eager_sharding=False`) and placed by a jitted constructor with
`out_shardings` (see `zoo/train.py`): one policy, everywhere.

Multi-process helpers wait through the jax.distributed key-value store,
which has timeouts, rather than through collectives, which have none.
"""

import collections
import math

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax._src import distributed
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab")
BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB = LOGICAL_AXES

# Default logical -> mesh rules (config.mesh.rules): batch over data and
# fsdp, parameters' embed axis over fsdp (FSDP), heads, mlp and vocab over
# tensor (tensor parallel); axes not named are replicated.
DEFAULT_RULES = "batch=data+fsdp,embed=fsdp,heads=tensor,mlp=tensor,vocab=tensor"


def logical(init, *names: str | None):
  """An initializer whose variable carries logical axis `names`."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 to "the rest" and checks the product."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: sizes must be "
                     "positive, with at most one -1 (the rest)")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, shape))}: {known} does not divide the "
          f"{num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices "
        f"but {num_devices} are present; make mesh.data * mesh.fsdp * "
        f"mesh.tensor = {num_devices} (or set one to -1)")
  return tuple(shape)


def make_mesh(sizes: dict[str, int]) -> jax.sharding.Mesh:
  """A mesh over all devices (ICI/DCN-aware order from jax.make_mesh)."""
  shape = mesh_shape(sizes, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def parse_rules(text: str) -> tuple:
  """"batch=data+fsdp,embed=fsdp" -> (("batch", ("data", "fsdp")),
  ("embed", "fsdp"), ...), every logical axis present (None = replicated)."""
  named = {}
  for item in filter(None, (i.strip() for i in text.split(","))):
    logical_axis, _, mesh_axes = item.partition("=")
    axes = tuple(a.strip() for a in mesh_axes.split("+") if a.strip())
    if logical_axis.strip() not in LOGICAL_AXES or not axes or any(
        a not in MESH_AXES for a in axes):
      raise ValueError(
          f"mesh.rules item {item!r}: write logical=mesh[+mesh] with logical "
          f"in {', '.join(LOGICAL_AXES)} and mesh in {', '.join(MESH_AXES)}")
    named[logical_axis.strip()] = axes[0] if len(axes) == 1 else axes
  return tuple((a, named.get(a)) for a in LOGICAL_AXES)


def state_shardings(abstract_state, mesh, axis_rules):
  """NamedShardings for an nnx state from its logical annotations."""
  with nn.logical_axis_rules(axis_rules):
    specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs)


def batch_sharding(mesh, axis_rules) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over the data axes."""
  with nn.logical_axis_rules(axis_rules):
    spec = nn.logical_to_mesh_axes(("batch",))
  return NamedSharding(mesh, P(*spec))


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
  """Assembles each process's slice of the batch into global arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def constrain(x, names: tuple[str | None, ...]):
  """Activation sharding constraint by logical names (no-op outside the
  trainer's rules)."""
  return nn.with_logical_constraint(x, names)


def kv_client():
  """The jax.distributed key-value client of a multi-process run, else None.

  JAX exposes it only as `jax._src.distributed.global_state.client`; the
  trainer uses it for waits that have a bound (collectives have none)."""
  return distributed.global_state.client if jax.process_count() > 1 else None


class PeerError(RuntimeError):
  """Another process failed; the message names it and its error."""


_rounds = collections.Counter()  # on_process_0 calls so far, by name


def on_process_0(fn, name: str):
  """Runs `fn()` on process 0 while the other processes wait for it, then
  returns fn's result on process 0 and None elsewhere. If fn raises, every
  other process raises PeerError with its message, so no process goes on
  alone.

  The wait is a key-value lookup, not a collective: it ends when process 0
  answers, and a lost process 0 or SIGTERM ends the run (see zoo.train).
  Every process must make the same calls in the same order."""
  client = kv_client()
  if client is None:
    return fn()
  _rounds[name] += 1
  key = f"zoo/on_process_0/{name}/{_rounds[name]}"
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:
      first_line = (str(e).strip().splitlines() or [""])[0]
      client.key_value_set(key, f"{type(e).__name__}: {first_line}")
      raise
    client.key_value_set(key, "")
    return result
  error = None
  while error is None:  # in 1 s slices, so that Ctrl-C gets through
    try:
      error = client.blocking_key_value_get(key, 1000)
    except jax.errors.JaxRuntimeError as e:
      if "DEADLINE_EXCEEDED" not in str(e):
        raise
  if error:
    raise PeerError(f"process 0 failed to {name}: {error}")
  return None
