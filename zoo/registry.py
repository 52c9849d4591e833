"""One registry for every pluggable part: attention ops, positional encodings,
models and tasks.

A part is registered under a name with `@register(kind, name)`. A spec is a
string a flag can carry, `"local(window=128)"`, parsed with `ast` into a name
and keyword arguments. The spec may set a part's keyword parameters that have
defaults; parameters without defaults are supplied by the caller (a model
passes `num_heads` to a positional encoding, for example).

    registry.names("attention")
    op = registry.build("attention", "local(window=128)")
    pe = registry.build("position", "alibi", num_heads=8)

Every error (unknown kind, name or keyword, wrong type, bad syntax) is a
`ValueError` with one line that names the valid choices.
"""

import ast
import dataclasses
import importlib
import inspect
import textwrap
import typing
from typing import Any, Callable

# Where the parts of each kind live; imported on first use so that
# `zoo.registry` sits at the bottom of the import graph.
KINDS = {
    "attention": "zoo.attention",
    "position": "zoo.position",
    "model": "zoo.models",
    "task": "zoo.data",
}

_PARTS: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}

# Parameters that callers supply (never set by a spec): NNX plumbing, the
# layer index a model gives each layer's attention op (`op.for_layer`) and
# the training step it binds to ops that redraw (`op.at_step`).
_CONTEXT = ("rngs", "dtype", "param_dtype", "layer", "step")

# Length at which `python -m zoo.registry` reports each op's key budget and
# decode state, and the head dim of the state it reports.
_BUDGET_LENGTH = 4096
_STATE_HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class Param:
  """One spec-settable parameter of a registered part."""

  name: str
  default: Any
  type: Any


def register(kind: str, name: str):
  """Class or function decorator that registers a part under `name`."""
  _check_kind(kind)

  def wrap(part):
    if name in _PARTS[kind]:
      raise ValueError(f"{kind} {name!r} is registered twice")
    _PARTS[kind][name] = part
    part.registry_name = name
    return part

  return wrap


def names(kind: str) -> list[str]:
  """Sorted names registered under `kind`."""
  return sorted(_parts(kind))


def get(kind: str, name: str) -> Callable[..., Any]:
  """The registered class or function (not built)."""
  parts = _parts(kind)
  if name not in parts:
    raise ValueError(
        f"unknown {kind} {name!r}; valid: {', '.join(sorted(parts))}")
  return parts[name]


def parse(spec: str) -> tuple[str, dict[str, Any]]:
  """`"local(window=128)"` -> `("local", {"window": 128})`."""
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError:
    raise ValueError(
        f"cannot parse spec {spec!r}; write name or name(key=value, ...)"
    ) from None
  if isinstance(node, ast.Name):
    return node.id, {}
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and not node.args):
    kwargs = {}
    for kw in node.keywords:
      if kw.arg is None:
        raise ValueError(f"spec {spec!r}: ** is not allowed")
      try:
        kwargs[kw.arg] = ast.literal_eval(kw.value)
      except ValueError:
        raise ValueError(
            f"spec {spec!r}: value of {kw.arg!r} must be a literal "
            "(number, string, bool, None, tuple)") from None
    return node.func.id, kwargs
  raise ValueError(
      f"cannot parse spec {spec!r}; write name or name(key=value, ...) "
      "with keyword arguments only")


def params(kind: str, name: str) -> list[Param]:
  """The spec-settable parameters of a part, with defaults and types."""
  part = get(kind, name)
  target = part.__init__ if inspect.isclass(part) else part
  hints = typing.get_type_hints(target)
  out = []
  for p in inspect.signature(target).parameters.values():
    if p.name == "self" or p.default is inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL,
                                                          p.VAR_KEYWORD):
      continue
    if p.name in _CONTEXT:
      continue
    out.append(Param(p.name, p.default, hints.get(p.name, Any)))
  return out


def validate(kind: str, spec: str) -> tuple[str, dict[str, Any]]:
  """Parses `spec` and checks its name, keywords and value types."""
  name, kwargs = parse(spec)
  get(kind, name)
  allowed = {p.name: p for p in params(kind, name)}
  for key, value in kwargs.items():
    if key not in allowed:
      valid = ", ".join(allowed) or "none"
      raise ValueError(f"{kind} {name!r} has no argument {key!r}; "
                       f"valid: {valid}")
    if not _type_ok(value, allowed[key].type):
      raise ValueError(
          f"{kind} {name}({key}=...) must be {_type_name(allowed[key].type)}, "
          f"got {value!r}")
  return name, kwargs


def build(kind: str, spec: str, **context) -> Any:
  """Builds the part named by `spec`; `context` supplies caller arguments."""
  name, kwargs = validate(kind, spec)
  return get(kind, name)(**kwargs, **context)


def describe(kind: str, name: str) -> str:
  """`name(arg: type = default, ...)` for the listing."""
  args = ", ".join(f"{p.name}: {_type_name(p.type)} = {p.default!r}"
                   for p in params(kind, name))
  return f"{name}({args})"


def _check_kind(kind: str):
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")


def _parts(kind: str) -> dict[str, Callable[..., Any]]:
  _check_kind(kind)
  importlib.import_module(KINDS[kind])
  return _PARTS[kind]


def _type_ok(value, annotation) -> bool:
  if annotation is Any:
    return True
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
    return any(_type_ok(value, a) for a in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if origin is tuple:
    return isinstance(value, tuple)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if inspect.isclass(annotation):
    return isinstance(value, annotation)
  return True


def _type_name(annotation) -> str:
  if inspect.isclass(annotation) and typing.get_origin(annotation) is None:
    return annotation.__name__
  return str(annotation).replace("typing.", "")


def compatible(attention: str, position: str) -> bool:
  """Whether an attention op (a spec; its defaults when only a name) can
  take a positional encoding (by name)."""
  return get("position", position).kind in build("attention", attention
                                                 ).positions


def print_stack(attention: str, num_layers: int, length: int,
                kv_heads: int, head_dim: int):
  """Prints each layer's op of a stack spec with its key budget and decode
  state at `length`, and the stack's totals."""
  from zoo import layers  # imports the registry: a CLI-only dependency
  ops = layers.layer_ops(attention, num_layers)
  specs = layers.stack_specs(attention)
  print(f"{attention!r} over {num_layers} layers at length {length} "
        f"({kv_heads} kv heads of dim {head_dim}):")
  print(f"  {'layer':>5}  {'op':<32} {'keys/query causal':>17} "
        f"{'decode state floats':>19}")
  for i, op in enumerate(ops):
    print(f"  {i:>5}  {specs[i % len(specs)]:<32} "
          f"{op.keys_per_query(length, True):>17.1f} "
          f"{op.state_size(length, kv_heads, head_dim):>19}")
  budget = layers.stack_budget(attention, num_layers, length, True, kv_heads,
                               head_dim)
  print(f"  keys per query (mean over layers) {budget['keys_per_query']:.1f};"
        f" decode state {budget['state_floats']} floats per batch row "
        f"({budget['state_floats_per_layer']:.0f} per layer)")


def main(argv: list[str]):
  """With no arguments, prints every registered part with its arguments and
  defaults, then which attention ops take which positional encodings. With
  a stack spec (`'gla;gla;standard' --num_layers=6`), prints its layers'
  budgets."""
  if argv:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m zoo.registry")
    parser.add_argument("attention", help="a spec or 'spec;spec;...'")
    parser.add_argument("--num_layers", type=int, default=0,
                        help="layers (default: one per spec)")
    parser.add_argument("--length", type=int, default=_BUDGET_LENGTH)
    parser.add_argument("--kv_heads", type=int, default=1)
    parser.add_argument("--head_dim", type=int, default=_STATE_HEAD_DIM)
    a = parser.parse_args(argv)
    num_layers = a.num_layers or len(a.attention.split(";"))
    try:
      if num_layers % len(a.attention.split(";")):
        raise ValueError(f"{a.attention!r} lists specs that do not divide "
                         f"--num_layers={num_layers}")
      print_stack(a.attention, num_layers, a.length, a.kv_heads, a.head_dim)
    except ValueError as e:
      parser.exit(2, f"error: {e}\n")
    return
  for kind in KINDS:
    print(f"[{kind}]")
    for name in names(kind):
      doc = " ".join((inspect.getdoc(get(kind, name)) or "").split("\n\n")[0]
                     .split())
      print(f"  {describe(kind, name)}")
      print(textwrap.fill(doc, 79, initial_indent=" " * 6,
                          subsequent_indent=" " * 6))
      if kind == "attention":
        op = build(kind, name)
        print(f"      keys per query at length {_BUDGET_LENGTH}: causal "
              f"{op.keys_per_query(_BUDGET_LENGTH, True):.0f}, bidirectional "
              f"{op.keys_per_query(_BUDGET_LENGTH, False):.0f}; decode state "
              f"per kv head of dim {_STATE_HEAD_DIM}: "
              f"{op.state_size(_BUDGET_LENGTH, 1, _STATE_HEAD_DIM)} floats")
  positions = names("position")
  width = max(map(len, positions)) + 1
  print("\n[attention x position]  (masks: causal, padding [batch, kv_len]; "
        "'full' = also [batch, q_len, kv_len])")
  name_width = max(map(len, names("attention"))) + 1
  print(" " * name_width + "".join(p.rjust(width) for p in positions)
        + "  masks")
  for attention in names("attention"):
    marks = "".join(("yes" if compatible(attention, p) else "-").rjust(width)
                    for p in positions)
    masks = "full" if build("attention", attention).full_mask else "padding"
    print(attention.ljust(name_width) + marks + "  " + masks)


if __name__ == "__main__":
  import sys
  from zoo import registry  # the imported module, which the parts fill
  registry.main(sys.argv[1:])
