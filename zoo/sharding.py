"""The layout: logical axis names, their mapping to mesh axes, and the
device mesh (`Layout` holds the mesh and the rules together).

Parameters and activations are annotated with logical axes ("batch",
"length", "embed", "heads", "kv", "mlp", "vocab"); `config.mesh.rules`
maps each to mesh axes ("data", "fsdp", "sequence", "tensor"), so data
parallel, FSDP, sequence (context) parallel and tensor parallel are config
changes. Variables are created unsharded
(`eager_sharding=False`) and placed by a jitted constructor with
`out_shardings` (see `zoo/plan.py`): one policy, everywhere.
"""

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab")
BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB = LOGICAL_AXES

# Default logical -> mesh rules (config.mesh.rules): batch over data and
# fsdp, activations' length over sequence, parameters' embed axis over fsdp
# (FSDP), heads, mlp and vocab over tensor (tensor parallel); axes not named
# are replicated.
DEFAULT_RULES = ("batch=data+fsdp,length=sequence,embed=fsdp,heads=tensor,"
                 "mlp=tensor,vocab=tensor")


def logical(init, *names: str | None):
  """An initializer whose variable carries logical axis `names`."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def length_axis() -> tuple[str, int] | None:
  """(mesh axis, size) that the current logical rules shard activations'
  length over, when the current mesh has that axis with size > 1 (one
  mesh axis; else None). Ops with a context-parallel form ask this while
  tracing."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spec = nn.logical_to_mesh_axes((LENGTH,))
  name = None if spec is None else spec[0]
  if not isinstance(name, str) or mesh.shape.get(name, 1) == 1:
    return None
  return name, mesh.shape[name]


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 to "the rest" and checks the product; an axis not in
  `sizes` (a config from before it existed) has size 1."""
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
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
        f"mesh.sequence * mesh.tensor = {num_devices} (or set one to -1)")
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
    spec = nn.logical_to_mesh_axes((BATCH,))
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


@dataclasses.dataclass(frozen=True)
class Layout:
  """A device mesh and the logical-axis rules that map onto it. `with
  layout:` makes both current (jax's mesh and flax's logical rules), as
  building, restoring, stepping and decoding a sharded model need."""

  mesh: jax.sharding.Mesh
  rules: tuple
  _open: list = dataclasses.field(default_factory=list, init=False,
                                  repr=False, compare=False)

  @classmethod
  def from_config(cls, mesh_config) -> "Layout":
    """From a run's `config.mesh` (sizes of data, fsdp, tensor and the
    rules string)."""
    return cls(make_mesh(dict(mesh_config)), parse_rules(mesh_config.rules))

  def __enter__(self) -> "Layout":
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    self._open.append(stack)
    return self

  def __exit__(self, *exc):
    return self._open.pop().__exit__(*exc)

  def state_shardings(self, abstract_state):
    return state_shardings(abstract_state, self.mesh, self.rules)

  def batch_sharding(self) -> NamedSharding:
    return batch_sharding(self.mesh, self.rules)
