"""Writing an experiment's results: a markdown table, raw JSON and the
command that reproduced them, under experiments/results/NAME/; for sweeps,
the tables of mean and 95% interval over seeds and their plot
(`write_sweep`)."""

import dataclasses
import json
import math
import os
import shlex
import sys
import textwrap

import numpy as np
from scipy import stats

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


def write(name: str, title: str, body: str, raw: dict, out_dir: str = "",
          cmd: str = ""):
  """Writes RESULTS.md (title, command, body) and raw.json; returns the
  folder. Plots are saved by the caller into the same folder. `cmd`
  replaces this program's own command line (a sweep records the command
  that runs it, not the one that wrote the report)."""
  folder = out_dir or os.path.join(RESULTS, name)
  os.makedirs(folder, exist_ok=True)
  cmd = cmd or command()
  notes = kept_notes(os.path.join(folder, "RESULTS.md"))
  with open(os.path.join(folder, "RESULTS.md"), "w") as f:
    f.write(f"# {title}\n\nMade by:\n\n    {cmd}\n\n{body}\n{notes}")
  with open(os.path.join(folder, "raw.json"), "w") as f:
    json.dump({"command": cmd, **raw}, f, indent=1)
  print(f"wrote {folder}; reproduce with:\n  {cmd}")
  return folder


# A RESULTS.md section that a rerun keeps: figures of earlier runs (what a
# number was before a change), each with its command, written by hand.
NOTES_HEADING = "## Notes from earlier runs"


def kept_notes(path: str) -> str:
  """The NOTES_HEADING section (to the end) of the RESULTS.md at `path`,
  or "" if it has none."""
  if not os.path.isfile(path):
    return ""
  with open(path) as f:
    text = f.read()
  at = text.find(NOTES_HEADING)
  return "" if at < 0 else "\n" + text[at:]


def results_dir(name: str, out_dir: str = "") -> str:
  folder = out_dir or os.path.join(RESULTS, name)
  os.makedirs(folder, exist_ok=True)
  return folder


def mean_ci(values, level: float = 0.95) -> tuple[float, float, int]:
  """Mean, half-width of the two-sided Student-t interval at `level` (n - 1
  degrees of freedom) and n. The half-width is nan for n < 2."""
  x = np.asarray(values, float)
  n = len(x)
  if n < 2:
    return (float(x[0]) if n else math.nan), math.nan, n
  half = stats.t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
  return float(x.mean()), float(half), n


def format_ci(mean: float, half: float, n: int) -> str:
  """`mean ± half (n=N)`: four significant digits, two for the half-width,
  whole numbers from 1000 (10 for the half-width) up."""
  if n == 0:
    return "-"
  text = f"{mean:.0f}" if abs(mean) >= 1000 else f"{mean:.4g}"
  if n == 1:
    return f"{text} (n=1)"
  return (f"{text} ± {half:.0f}" if half >= 10 else
          f"{text} ± {half:.2g}") + f" (n={n})"


def _short(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def _label(values) -> str:
  return ", ".join(str(v) for v in values)


def _unique(items) -> list:
  return list(dict.fromkeys(items))


def summarize(records: list[dict], analysis) -> list[dict]:
  """The rows of a sweep's tables, one per (panel, line, x): the mean and
  interval over seeds of the finished cells' values, at the best values of
  `analysis.best_over` (best by that mean), with the failed and unfinished
  cells of every value counted. With `analysis.time_views`, also the
  values at equal training time (`at_time`, interpolated along each cell's
  eval curve at the shortest cell's training seconds in the panel; a cell
  not yet evaluated by then is left out) and
  whether the row is on the Pareto front of the metric against training
  tokens/s. Rows keep the grid's order."""
  a = analysis
  groups = {}
  for r in records:
    key = repr([(k, v) for k, v in sorted(r["axes"].items()) if k != "seed"])
    groups.setdefault(key, []).append(r)
  options = {}
  for cells in groups.values():
    axes = cells[0]["axes"]
    done = [c for c in cells if c["status"] == "done"]
    mean, half, n = mean_ci([c["value"] for c in done])
    row = {
        "panel": tuple(axes[k] for k in a.panels),
        "line": tuple(axes[k] for k in a.line),
        "x": axes[a.x] if a.x else None,
        "best": {k: axes[k] for k in a.best_over},
        "mean": mean, "half": half, "n": n,
        "failed": sum(c["status"] == "failed" for c in cells),
        "unfinished": sum(c["status"] not in ("done", "failed")
                          for c in cells),
        "attention": _unique(c["attention"] for c in done),
        "keys_per_query": _unique(c["keys_per_query"] for c in done),
        "tokens_per_s": mean_ci([c["tokens_per_s"] for c in done]),
        "train_s": mean_ci([c["train_s"] for c in done]),
        "cells": done,
    }
    options.setdefault((row["panel"], row["line"], row["x"]), []).append(row)
  better = max if a.higher_is_better else min
  rows = []
  for choices in options.values():
    scored = [r for r in choices if r["n"]]
    row = dict(better(scored, key=lambda r: r["mean"]) if scored
               else choices[0])
    row["failed"] = sum(r["failed"] for r in choices)
    row["unfinished"] = sum(r["unfinished"] for r in choices)
    row["choices"] = len(choices)
    rows.append(row)
  if a.time_views:
    for panel in _unique(r["panel"] for r in rows):
      _time_views([r for r in rows if r["panel"] == panel and r["n"]],
                  a.higher_is_better)
  return rows


def _time_views(rows: list[dict], higher_is_better: bool):
  if not rows:
    return
  budget = min(c["train_s"] for r in rows for c in r["cells"])
  for r in rows:
    r["time_budget_s"] = budget
    r["at_time"] = mean_ci([
        np.interp(budget, [p[1] for p in c["curve"]],
                  [p[2] for p in c["curve"]])
        for c in r["cells"] if c["curve"][0][1] <= budget])
  sign = 1 if higher_is_better else -1

  def dominates(o, r):
    speed, value = o["tokens_per_s"][0], sign * o["mean"]
    return (speed >= r["tokens_per_s"][0] and value >= sign * r["mean"]
            and (speed, value) != (r["tokens_per_s"][0], sign * r["mean"]))

  for r in rows:
    r["pareto"] = not any(dominates(o, r) for o in rows if o is not r)


def _entry(row, a, with_best: bool) -> str:
  text = format_ci(row["mean"], row["half"], row["n"])
  notes = [f"{_short(k)}={v}" for k, v in row["best"].items()] if (
      with_best and row["n"] and row["choices"] > 1) else []
  if row["failed"]:
    notes.append(f"{row['failed']} failed")
  if row["unfinished"]:
    notes.append(f"{row['unfinished']} not finished")
  return f"{text} [{'; '.join(notes)}]" if notes else text


def _as_run(rows) -> tuple[str, str]:
  """Attention specs as run and their keys per query, over `rows`."""
  specs = _unique(s for r in rows for s in r["attention"])
  keys = _unique(k for r in rows for k in r["keys_per_query"])
  return (" / ".join(specs) or "-",
          " / ".join(f"{k:.1f}" for k in keys) or "-")


def sweep_tables(rows: list[dict], analysis) -> str:
  """Markdown: per panel, a table of mean ± 95% interval (n) per line, with
  the x values as columns, or else the metric (with the published number,
  the equal wall-clock value, tokens/s and training seconds) as columns."""
  a = analysis
  parts = []
  for panel in _unique(r["panel"] for r in rows):
    prows = [r for r in rows if r["panel"] == panel]
    if panel:
      parts.append("### " + ", ".join(
          f"{_short(k)}={v}" for k, v in zip(a.panels, panel)))
    lines = _unique(r["line"] for r in prows)
    header = [", ".join(_short(k) for k in a.line), "attention as run",
              "keys/query"]
    table = []
    if a.x:
      xs = _unique(r["x"] for r in prows)
      header += [f"{_short(a.x)}={x}" for x in xs]
      for line in lines:
        lrows = [r for r in prows if r["line"] == line]
        by_x = {r["x"]: r for r in lrows}
        table.append([_label(line), *_as_run(lrows)] + [
            _entry(by_x[x], a, True) if x in by_x else "-" for x in xs])
    else:
      header += [a.metric] + [f"best {_short(k)}" for k in a.best_over]
      if a.reference:
        header.append("published")
      if a.time_views:
        budget = next((r["time_budget_s"] for r in prows if r["n"]), None)
        header += [f"{a.metric} at {budget or 0:.3g} s of training",
                   "train tokens/s", "train s", "Pareto"]
      for r in prows:
        label = _label(r["line"])
        row = [label, *_as_run([r]), _entry(r, a, False)]
        row += [str(v) if r["n"] else "-" for v in r["best"].values()]
        if a.reference:
          name, value = a.reference.get(label, ("", None))
          row.append(f"{value:.4g} ({name})" if name else "-")
        if a.time_views:
          row += ([format_ci(*r["at_time"]), format_ci(*r["tokens_per_s"]),
                   f"{r['train_s'][0]:.3g}",
                   "yes" if r["pareto"] else "no"] if r["n"]
                  else ["-"] * 4)
        table.append(row)
    parts.append(markdown_table(header, table))
    if a.reference:
      parts.append(_ordering(prows, a))
  return "\n\n".join(parts)


def _ordering(rows, a) -> str:
  """Our ranking beside the published one, and Kendall's tau between them."""
  pairs = [(_label(r["line"]), r["mean"], a.reference[_label(r["line"])])
           for r in rows if r["n"] and _label(r["line"]) in a.reference]
  if len(pairs) < 2:
    return "Too few finished rows to compare with the published ordering."
  sign = -1 if a.higher_is_better else 1
  ours = sorted(pairs, key=lambda p: sign * p[1])
  theirs = sorted(pairs, key=lambda p: sign * p[2][1])
  tau = stats.kendalltau([p[1] for p in pairs], [p[2][1] for p in pairs])
  return (f"Ordering, ours: {' > '.join(p[0] for p in ours)}. Published "
          f"({a.reference_source}): "
          f"{' > '.join(f'{p[2][0]} ({p[0]})' for p in theirs)}. Kendall's "
          f"tau between the two: {tau.statistic:.2f} over {len(pairs)} "
          "variants.")


def sweep_plot(path: str, rows: list[dict], analysis, title: str):
  """Error-bar plot of the rows: metric against x, a line per line label
  and a panel per panel; without x, a point per line label (with the
  published numbers as markers), plus the equal wall-clock values and the
  Pareto plot when the analysis has time views."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  a = analysis
  panels = _unique(r["panel"] for r in rows)
  if a.x:
    shape = (1, len(panels))
  else:
    shape = (len(panels), 3 if a.time_views else 1)
  fig, axes = plt.subplots(*shape, figsize=(4.5 * shape[1] + 1,
                                            3.8 * shape[0] + 0.6),
                           squeeze=False)
  for i, panel in enumerate(panels):
    prows = [r for r in rows if r["panel"] == panel and r["n"]]
    name = textwrap.fill(", ".join(f"{_short(k)}={v}"
                                   for k, v in zip(a.panels, panel)), 48)
    if a.x:
      ax = axes[0, i]
      for line in _unique(r["line"] for r in prows):
        lrows = sorted((r for r in prows if r["line"] == line),
                       key=lambda r: r["x"])
        ax.errorbar([r["x"] for r in lrows], [r["mean"] for r in lrows],
                    yerr=[np.nan_to_num(r["half"]) for r in lrows],
                    marker="o", capsize=3, label=_label(line))
      xs = sorted(_unique(r["x"] for r in prows))
      if xs and min(xs) > 0 and max(xs) >= 4 * min(xs):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
      ax.set_xticks(xs, [str(x) for x in xs])
      ax.set(xlabel=_short(a.x), ylabel=a.metric, title=name)
      continue
    labels = [_label(r["line"]) for r in prows]
    pos = np.arange(len(prows))
    views = [("at equal steps", [(r["mean"], r["half"]) for r in prows])]
    if a.time_views:
      budget = prows[0]["time_budget_s"] if prows else 0
      views.append((f"at equal training time ({budget:.3g} s)",
                    [r["at_time"][:2] for r in prows]))
    for j, (view, values) in enumerate(views):
      ax = axes[i, j]
      ax.errorbar(pos, [v[0] for v in values],
                  yerr=[np.nan_to_num(v[1]) for v in values], fmt="o",
                  capsize=3, label="ours (mean, 95% interval)")
      refs = [a.reference.get(label) for label in labels]
      if j == 0 and any(refs):
        ax.scatter([p for p, ref in zip(pos, refs) if ref],
                   [ref[1] for ref in refs if ref], color="black", marker="D",
                   zorder=3, label=f"published ({a.reference_source})")
        ax.legend(fontsize=7, loc="upper center", ncol=2,
                  bbox_to_anchor=(0.5, -0.6))
      ax.set_xticks(pos, labels, rotation=40, ha="right", fontsize=7)
      ax.set(ylabel=a.metric, title=f"{name} {view}".strip())
    if a.time_views:
      ax = axes[i, 2]
      ax.errorbar([r["tokens_per_s"][0] for r in prows],
                  [r["mean"] for r in prows],
                  xerr=[np.nan_to_num(r["tokens_per_s"][1]) for r in prows],
                  yerr=[np.nan_to_num(r["half"]) for r in prows], fmt="o",
                  capsize=3)
      for r, label in zip(prows, labels):
        ax.annotate(label, (r["tokens_per_s"][0], r["mean"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
      front = sorted((r for r in prows if r["pareto"]),
                     key=lambda r: r["tokens_per_s"][0])
      ax.plot([r["tokens_per_s"][0] for r in front],
              [r["mean"] for r in front], ls="--", color="gray",
              label="Pareto front")
      ax.legend(fontsize=7)
      ax.set(xlabel="training tokens/s", ylabel=a.metric,
             title=f"{name} {a.metric} against speed".strip())
  for ax in axes.flat:
    ax.grid(True, alpha=0.3)
  if a.x:
    axes[0, 0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _jsonable(value):
  """nan -> None and tuples -> lists, recursively, for strict JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def write_sweep(grid, records: list[dict], *, cmd: str, preset: str,
                out_dir: str) -> str:
  """Writes a sweep's RESULTS.md (command, description, counts, tables,
  plot, failed and unfinished cells), NAME.png and raw.json (every cell's
  record and every table row) into `out_dir`; returns the folder."""
  a = grid.analysis
  folder = results_dir(grid.name, out_dir)
  rows = summarize(records, a)
  status = {s: [r for r in records if r["status"] == s]
            for s in ("done", "failed", "interrupted", "pending")}
  parts = [grid.description, _setup(grid, preset, status)]
  if status["done"]:
    plot = f"{grid.name}.png"
    sweep_plot(os.path.join(folder, plot), rows, a, grid.title)
    parts += [sweep_tables(rows, a), f"![{grid.name}]({plot})"]
    if grid.analyze:
      parts.append(grid.analyze(records, folder))
  if status["failed"]:
    parts.append("## Failed cells\n\n" + markdown_table(
        ["cell", "error"], [[r["name"], r["error"].replace("|", "\\|")]
                            for r in status["failed"]]))
  unfinished = status["interrupted"] + status["pending"]
  if unfinished:
    parts.append("## Not finished\n\n" + "\n".join(
        f"- {r['name']} ({r['status']})" for r in unfinished))
  raw = {"preset": preset, "base_config": grid.base.to_dict(),
         "axes": grid.axes, "analysis": dataclasses.asdict(a),
         "cells": records,
         "rows": [{k: v for k, v in r.items() if k != "cells"} for r in rows]}
  return write(grid.name, grid.title, "\n\n".join(parts), _jsonable(raw),
               folder, cmd)


def _setup(grid, preset: str, status: dict) -> str:
  """What ran: preset, axes, metric, statistics, devices and cell counts."""
  a = grid.analysis
  axes = grid.axes if isinstance(grid.axes, list) else [grid.axes]
  products = " plus ".join(
      "(" + " x ".join(f"`{k}` in {v}" for k, v in p.items()) + ")"
      for p in axes)
  devices = _unique(r["device"] for r in status["done"])
  best = (f" For each row the best {', '.join(_short(k) for k in a.best_over)}"
          " by mean over seeds is kept (selected on the reported metric, so "
          "optimistic by the selection, as in Zoology)." if a.best_over
          else "")
  return (
      f"Preset `{preset}`; cells: {products}; everything else from the base "
      f"config (raw.json `base_config`). Value of a cell: the last logged "
      f"`{a.metric}` ({'higher' if a.higher_is_better else 'lower'} is "
      "better); tables give the mean ± 95% Student-t interval over seeds "
      f"(n seeds, n - 1 degrees of freedom).{best} Keys/query is each "
      "attention op's `keys_per_query` at the cell's length. Ran on: "
      f"{', '.join(devices) or '-'}.\n\nCells: {len(status['done'])} done, "
      f"{len(status['failed'])} failed, "
      f"{len(status['interrupted']) + len(status['pending'])} not finished.")
