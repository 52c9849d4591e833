"""Writing an experiment's results: a markdown table, raw JSON and the
command that reproduced them, under experiments/results/NAME/."""

import json
import os
import shlex
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def command() -> str:
  """The command line that ran this program, as a user would type it."""
  module = os.path.splitext(os.path.relpath(sys.argv[0]))[0].replace("/", ".")
  return " ".join(["python -m", module] + [shlex.quote(a)
                                           for a in sys.argv[1:]])


def markdown_table(header: list[str], rows: list[list]) -> str:
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write(name: str, title: str, body: str, raw: dict, out_dir: str = ""):
  """Writes RESULTS.md (title, command, body) and raw.json; returns the
  folder. Plots are saved by the caller into the same folder."""
  folder = out_dir or os.path.join(RESULTS, name)
  os.makedirs(folder, exist_ok=True)
  cmd = command()
  with open(os.path.join(folder, "RESULTS.md"), "w") as f:
    f.write(f"# {title}\n\nMade by:\n\n    {cmd}\n\n{body}\n")
  with open(os.path.join(folder, "raw.json"), "w") as f:
    json.dump({"command": cmd, **raw}, f, indent=1)
  print(f"wrote {folder}; reproduce with:\n  {cmd}")
  return folder


def results_dir(name: str, out_dir: str = "") -> str:
  folder = out_dir or os.path.join(RESULTS, name)
  os.makedirs(folder, exist_ok=True)
  return folder
