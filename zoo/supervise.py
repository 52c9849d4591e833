"""Keeping a run bounded and its processes coordinated: work done once on
process 0 while the others wait (`on_process_0`), at most a few programs in
flight, and a watchdog that turns SIGTERM, a lost peer or a failed peer into
a prompt, one-line exit of every process (a save first where the step
allows).

Processes talk through the jax.distributed key-value store, which has
timeouts, never through collectives, which have none.
"""

import collections
import os
import select
import signal
import sys
import threading
import time

import jax
from absl import logging
from jax._src import distributed


def first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [""])[0]


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
      client.key_value_set(key, f"{type(e).__name__}: {first_line(e)}")
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


# Programs dispatched and not yet finished, at most (see InFlight).
_MAX_IN_FLIGHT = 2


class InFlight:
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


def leave(code: int, timeout_s: float, lost=()):
  """Exits the process now, skipping interpreter shutdown (whose
  distributed barrier would wait for processes that have gone). Process 0
  hosts the key-value store that the others read, so it leaves last: it
  waits, at most `timeout_s`, for every other process but the `lost` ones to
  say it is leaving."""
  client = kv_client()
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


class Watchdog:
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
    Watchdog.runs += 1
    self.timeout_s = timeout_s
    self.interval = min(5.0, timeout_s / 10)  # between heartbeats
    self.client = kv_client()
    self.me, self.count = jax.process_index(), jax.process_count()
    self.prefix = f"zoo/run{Watchdog.runs}/"
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
                     f"{first_line(e)}", lost=[0])
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
    leave(1, self.timeout_s, lost)
