"""Where a result comes from: the commit and whether the code differed from
it when the program started, library versions, the CPU and its load; and
whether a result's code has changed since it was made (stale)."""

import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code a result depends on: a change here after a result was made marks
# it stale (results folders and documents are not code).
CODE = ["zoo", "experiments", "configs", ":(exclude)experiments/results"]
# The load when this module was imported: at the start of the program that
# writes a result, before it loaded the machine itself.
_LOAD_AT_START = os.getloadavg()[0]


def _git(*args) -> str:
  try:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _code_state() -> dict:
  return {"commit": _git("rev-parse", "HEAD") or None,
          "dirty": bool(_git("status", "--porcelain", "--untracked-files=no",
                             "--", *CODE))}


# The code this program runs: the checkout when it imported this module
# (at its start), not when it writes (edits made meanwhile are not loaded).
_CODE_AT_START = _code_state()


def provenance(load: float | None = None) -> dict:
  """Where a result comes from: the git commit and whether the code
  (`CODE`) differed from it when this program started, jax and flax
  versions, the CPU model and the 1-minute load average (`load`, else at
  the program's start)."""
  import flax
  import jax
  return {**_CODE_AT_START, "jax": jax.__version__, "flax": flax.__version__,
          "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
          "load_at_start": _LOAD_AT_START if load is None else load}


def changed_since(commit: str | None) -> list[str]:
  """Code files (`CODE`) that differ now from `commit` (all of them when
  the commit is unknown to this checkout)."""
  if not commit:
    return ["(no commit recorded)"]
  if not _git("rev-parse", "--verify", "-q", f"{commit}^{{commit}}"):
    return [f"(commit {commit[:10]} is not in this checkout)"]
  return [f for f in _git("diff", "--name-only", commit, "--", *CODE
                          ).splitlines() if f]


def stale_note(provenances: list[dict]) -> str:
  """A warning paragraph when a result's code has changed since it was
  made (or was uncommitted then), else ""."""
  lines = []
  for commit in dict.fromkeys(p.get("commit") for p in provenances):
    files = changed_since(commit)
    dirty = any(p.get("dirty") for p in provenances
                if p.get("commit") == commit)
    if files or dirty:
      what = (f"code changed since: {', '.join(files[:12])}"
              + (f" and {len(files) - 12} more" if len(files) > 12 else "")
              if files else "")
      lines.append(f"- made at {str(commit)[:10]}"
                   + (" with uncommitted changes" if dirty else "")
                   + (f"; {what}" if what else ""))
  return ("**Stale:** this result may not match the code now.\n"
          + "\n".join(lines) + "\n") if lines else ""
