"""Checkpoints with orbax: the train state (model and optimizer, as a pure
dict) and the grain iterator state, saved asynchronously every N steps into
DIR/checkpoints/<step>/ by all processes.

orbax skips unfinished (tmp) steps but does not fall back by itself when the
newest finalised step is damaged; `restore` tries steps newest first and
warns about each one it cannot read.
"""

import grain
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

  def __init__(self, directory: str, *, every: int, max_to_keep: int = 3):
    self.every = every
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def restore(self, abstract_state, data_iterator):
    """(state, step) from the newest readable step, or (None, 0). The
    abstract state holds jax.ShapeDtypeStructs with the target shardings;
    `data_iterator` is set to the saved position in place."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # noqa: BLE001 - any damage means "try older"
        logging.warning("checkpoint step %d is unreadable (%s: %s); trying "
                        "an older step", step, type(e).__name__, e)
        continue
      return restored["state"], step
    return None, 0

  def save(self, step: int, state, data_iterator, *, force: bool = False):
    """Starts an async save when `step` is due (or `force`)."""
    if not force and step % self.every:
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

  def close(self):
    """Waits for pending writes."""
    self.manager.wait_until_finished()
    self.manager.close()
