"""Checkpoints with orbax: the train state (model and optimizer, saved as a
pure dict) and the grain iterator state, written asynchronously into
DIR/checkpoints/<step>/ by all processes.

orbax skips unfinished (tmp) steps but does not fall back by itself when the
newest finalised step is damaged (missing files, an empty step folder).
`restore` tries steps newest first, warns about each unreadable one and moves
it aside to DIR/checkpoints_damaged/<step> (so a later save of that step
number can succeed); intact steps are never touched.
"""

import os
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from zoo import plan, sharding, supervise


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})
    self._unraisablehook = None  # the hook replaced by _quiet_stray_reads

  def restore(self, abstract_state, data_iterator=None):
    """(state, step) from the newest readable step, or (None, 0).

    `abstract_state` is an nnx.State of jax.ShapeDtypeStructs carrying the
    target shardings (which may differ from those saved); `data_iterator`, if
    given, is set to the saved position in place."""
    damaged = []
    restored = None
    for step in sorted(self.manager.all_steps(), reverse=True):
      items = {"state": ocp.args.StandardRestore(
          nnx.to_pure_dict(abstract_state))}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(step,
                                        args=ocp.args.Composite(**items))
        break
      except Exception as e:  # noqa: BLE001 - any damage means "try older"
        logging.warning("checkpoint step %d is unreadable (%s: %s); trying "
                        "an older step", step, type(e).__name__,
                        str(e).split("\n")[0][:200])
        damaged.append(step)
        self._quiet_stray_reads()
    self._move_aside(damaged)
    if restored is None:
      return None, 0
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored["state"])
    return state, step

  def _quiet_stray_reads(self):
    """A failed restore leaves reads in flight that later complete into
    orbax's closed event loop, each printing a "RuntimeError: Event loop is
    closed" traceback; the failure itself has been reported, so until
    `close` those are dropped (other unraisable errors pass through)."""
    if self._unraisablehook is not None:
      return
    self._unraisablehook = previous = sys.unraisablehook

    def hook(unraisable):
      if not (isinstance(unraisable.exc_value, RuntimeError) and
              str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)

    sys.unraisablehook = hook

  def _move_aside(self, steps):
    if not steps:
      return

    def move():
      aside = self.directory.rstrip("/") + "_damaged"
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(os.path.join(self.directory, str(step)), target)

    supervise.on_process_0(move, "move damaged checkpoints aside")
    self.manager.reload()

  def save(self, step: int, state, data_iterator):
    """Starts an async save of the nnx `state` and the iterator position."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def close(self):
    """Waits for pending writes."""
    self.manager.wait_until_finished()
    self.manager.close()
    if self._unraisablehook is not None:
      sys.unraisablehook, self._unraisablehook = self._unraisablehook, None


def restore_model(config, workdir: str):
  """(model, step) of `workdir`'s newest readable checkpoint (to evaluate or
  sample), placed on a layout built from `config`. Raises
  plan.ConfigError for a bad config, FileNotFoundError if there is no
  readable checkpoint."""
  p = plan.resolve(config)
  layout = sharding.Layout.from_config(config.mesh)
  s = plan.setup(p, layout, plan.make_optimizer(config)[0])
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  with layout:
    state, step = ckpt.restore(s.abstract_state)
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}")
  return nnx.merge(s.graphdef, state)[0], step


def quiet_orbax(record) -> bool:
  """A logging filter that drops orbax's per-save INFO lines (warnings
  stay)."""
  return record.levelno > 20 or "/orbax/" not in record.pathname


def mismatch(directory: str, abstract_params) -> str | None:
  """Why the newest checkpoint in `directory` cannot hold `abstract_params`
  (the model's nnx.State of shapes), or None. Reads metadata only and writes
  nothing; a directory without checkpoints matches anything."""
  if not os.path.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(directory)
  if not steps:
    return None
  step = max(steps)
  try:
    saved_tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(directory) / str(step) / "state")["0"]
  except Exception:  # noqa: BLE001 - damaged: restore() falls back later
    return None
  saved = _shapes(saved_tree)
  wanted = _shapes(nnx.to_pure_dict(abstract_params))
  for name in sorted(set(saved) | set(wanted)):
    if saved.get(name) != wanted.get(name):
      return (f"the checkpoint at step {step} in {directory} has parameter "
              f"{name} of shape {saved.get(name, 'absent')}, this config "
              f"makes {wanted.get(name, 'absent')}; use a new workdir or the "
              "config that wrote it")
  return None


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
          tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
