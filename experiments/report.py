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

from experiments.provenance import provenance, stale_note

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
  """Writes RESULTS.md (title, command, provenance, body) and raw.json
  (with `provenance()`); returns the folder. Plots are saved by the caller into the same folder. `cmd`
  replaces this program's own command line (a sweep records the command
  that runs it, not the one that wrote the report)."""
  folder = out_dir or os.path.join(RESULTS, name)
  os.makedirs(folder, exist_ok=True)
  cmd = cmd or command()
  made = provenance()
  notes = kept_notes(os.path.join(folder, "RESULTS.md"))
  with open(os.path.join(folder, "RESULTS.md"), "w") as f:
    f.write(f"# {title}\n\nMade by:\n\n    {cmd}\n\nat commit "
            f"{str(made['commit'])[:10]}"
            + (" with uncommitted changes" if made["dirty"] else "")
            + f" (jax {made['jax']}, flax {made['flax']}, {made['cpu']}, "
            f"load {made['load_at_start']:.2f} at the start).\n\n"
            f"{body}\n{notes}")
  with open(os.path.join(folder, "raw.json"), "w") as f:
    json.dump({"command": cmd, "provenance": made, **raw}, f, indent=1)
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
  `analysis.best_over` (best by the mean of the cells' `selection_value`,
  the validation split's), with the failed and unfinished cells of every
  value counted, the seeds that met the success threshold, the paired
  difference from the reference line (`_paired_differences`). With `analysis.time_views`, also the
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
    meets = lambda v: (v >= a.success_threshold if a.higher_is_better
                       else v <= a.success_threshold)
    row = {
        "selection": (np.mean([c.get("selection_value", c["value"])
                               for c in done]) if done else math.nan),
        "successes": (sum(meets(c["value"]) for c in done)
                      if a.success_threshold is not None else None),
        "steps_to_threshold": [c.get("steps_to_threshold") for c in done],
        "ceiling": _unique(c.get("ceiling") for c in done
                           if c.get("ceiling") is not None),
        "x_value": (float(np.mean([c[a.x_value] for c in done]))
                    if a.x_value and done else None),
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
    row = dict(better(scored, key=lambda r: r["selection"]) if scored
               else choices[0])
    row["failed"] = sum(r["failed"] for r in choices)
    row["unfinished"] = sum(r["unfinished"] for r in choices)
    row["choices"] = len(choices)
    rows.append(row)
  if a.time_views:
    for panel in _unique(r["panel"] for r in rows):
      _time_views([r for r in rows if r["panel"] == panel and r["n"]],
                  a.higher_is_better)
  if a.reference_line:
    _paired_differences(rows, a.reference_line)
  return rows


def _paired_differences(rows: list[dict], reference: str):
  """Sets each row's `paired` to (mean, 95% half-width, n) of its value
  minus the reference row's (same panel and x), over the seeds both
  finished; the differences are paired, as the seeds share their data
  order and initialisation."""
  by_seed = lambda r: {c["axes"]["seed"]: c["value"] for c in r["cells"]}
  refs = {(r["panel"], r["x"]): by_seed(r) for r in rows
          if _label(r["line"]) == reference}
  for r in rows:
    ref = refs.get((r["panel"], r["x"]))
    if ref is None or _label(r["line"]) == reference:
      r["paired"] = None
      continue
    mine = by_seed(r)
    r["paired"] = mean_ci([mine[s] - ref[s] for s in mine if s in ref])


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
  if row["n"] and row["successes"] is not None:
    notes.append(f"{row['successes']}/{row['n']} seeds "
                 f"{'≥' if a.higher_is_better else '≤'} "
                 f"{a.success_threshold:g}")
  if row["failed"]:
    notes.append(f"{row['failed']} failed")
  if row["unfinished"]:
    notes.append(f"{row['unfinished']} not finished")
  return f"{text} [{'; '.join(notes)}]" if notes else text


def _as_run(rows) -> tuple[str, str, str]:
  """Attention specs as run, their keys per query and decode-state floats
  per layer, over `rows`."""
  specs = _unique(s for r in rows for s in r["attention"])
  keys = _unique(k for r in rows for k in r["keys_per_query"])
  states = _unique(c.get("state_floats_per_layer") for r in rows
                   for c in r["cells"])
  return (" / ".join(specs) or "-",
          " / ".join(f"{k:.1f}" for k in keys) or "-",
          " / ".join(f"{v:.0f}" for v in states if v is not None) or "-")


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
    baselines = _baselines(prows)
    if baselines:
      parts.append("Baselines: " + "; ".join(
          f"{name} {value:.4g}" for name, value in baselines.items()) + ".")
    header = [", ".join(_short(k) for k in a.line), "attention as run",
              "keys/query", "decode state floats/layer"]
    with_ceiling = any(r["ceiling"] for r in prows)
    if with_ceiling:
      header.append("ceiling")
    table = []
    if a.x:
      xs = _unique(r["x"] for r in prows)
      header += [f"{_short(a.x)}={x}" for x in xs]
      for line in lines:
        lrows = [r for r in prows if r["line"] == line]
        by_x = {r["x"]: r for r in lrows}
        table.append([_label(line), *_as_run(lrows)]
                     + ([_ceilings(lrows)] if with_ceiling else []) + [
            _entry(by_x[x], a, True) if x in by_x else "-" for x in xs])
    else:
      header += [_value_name(prows, a)] + [f"best {_short(k)}"
                                           for k in a.best_over]
      if a.reference:
        header.append("published")
      if a.time_views:
        budget = next((r["time_budget_s"] for r in prows if r["n"]), None)
        header += [f"{a.metric} at {budget or 0:.3g} s of training",
                   "train tokens/s", "train s", "Pareto"]
      for r in prows:
        label = _label(r["line"])
        row = [label, *_as_run([r])] + (
            [_ceilings([r])] if with_ceiling else []) + [_entry(r, a, False)]
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
    if a.reference_line:
      parts.append(_paired_table(prows, a))
  return "\n\n".join(parts)


def _value_name(rows, a) -> str:
  """The reported metric's name: test_* where the cells report the test
  split, else the analysis's metric."""
  splits = {c.get("value_split") for r in rows for c in r["cells"]}
  return (a.metric.replace("eval_", "test_", 1) if splits == {"test"}
          else a.metric)


def _baselines(rows) -> dict[str, float]:
  """The chance and trivial baselines of a panel's cells."""
  out = {}
  for r in rows:
    for c in r["cells"]:
      out.update(c.get("baselines") or {})
  return out


def _ceilings(rows) -> str:
  values = _unique(v for r in rows for v in r["ceiling"])
  return " / ".join(f"{v:.3g}" for v in values) or "-"


def _paired_table(rows, a) -> str:
  """Each line's paired difference from the reference line, per x."""
  xs = _unique(r["x"] for r in rows)
  table = []
  for line in _unique(r["line"] for r in rows):
    if _label(line) == a.reference_line:
      continue
    by_x = {r["x"]: r for r in rows if r["line"] == line}
    table.append([_label(line)] + [
        format_ci(*by_x[x]["paired"]) if x in by_x and by_x[x]["paired"]
        and by_x[x]["paired"][2] else "-" for x in xs])
  header = [f"minus {a.reference_line} (paired over seeds, 95%)"] + (
      [f"{_short(a.x)}={x}" for x in xs] if a.x else [_value_name(rows, a)])
  return (f"Paired differences from {a.reference_line}: an interval that "
          "holds 0 orders nothing.\n\n" + markdown_table(header, table))


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
      where = lambda r: r["x_value"] if a.x_value else r["x"]
      for line in _unique(r["line"] for r in prows):
        lrows = sorted((r for r in prows if r["line"] == line), key=where)
        bars = ax.errorbar([where(r) for r in lrows],
                           [r["mean"] for r in lrows],
                           yerr=[np.nan_to_num(r["half"]) for r in lrows],
                           marker="o", capsize=3, label=_label(line))
        color = bars[0].get_color()
        for r in lrows:
          seeds = [c["value"] for c in r["cells"]]
          ax.scatter([where(r)] * len(seeds), seeds, color=color, s=9,
                     alpha=0.45, zorder=3)
          for ceiling in r["ceiling"]:
            ax.scatter([where(r)], [ceiling], color=color, marker="_", s=120)
      _draw_baselines(ax, _baselines(prows))
      xs = sorted(_unique(where(r) for r in prows))
      if xs and min(xs) > 0 and max(xs) >= 4 * min(xs):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
      if not a.x_value:
        ax.set_xticks(xs, [str(x) for x in xs])
      ax.set(xlabel=a.x_value or _short(a.x), ylabel=a.metric, title=name)
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
      if j == 0:
        for p, r in zip(pos, prows):
          ax.scatter([p] * r["n"], [c["value"] for c in r["cells"]],
                     color="gray", s=9, alpha=0.6, zorder=3)
        _draw_baselines(ax, _baselines(prows))
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


def _draw_baselines(ax, baselines: dict[str, float]):
  for name, value in baselines.items():
    ax.axhline(value, ls=":", color="gray", lw=1)
    ax.annotate(name, (0.01, value), xycoords=("axes fraction", "data"),
                fontsize=6, color="gray", va="bottom")


def curves_plot(path: str, records: list[dict], analysis, title: str):
  """Every finished cell's eval curve (the validation split) against
  steps, a panel per panel and a colour per line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  a = analysis
  done = [r for r in records if r["status"] == "done"]
  panel_of = lambda r: tuple(r["axes"][k] for k in a.panels)
  panels = _unique(panel_of(r) for r in done)
  lines = _unique(tuple(r["axes"][k] for k in a.line) for r in done)
  colours = {line: plt.cm.tab20(i % 20) for i, line in enumerate(lines)}
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1,
                                                    3.8), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    for r in (r for r in done if panel_of(r) == panel):
      line = tuple(r["axes"][k] for k in a.line)
      ax.plot([p[0] for p in r["curve"]], [p[2] for p in r["curve"]],
              color=colours[line], lw=0.8, alpha=0.7)
    ax.set(xlabel="step", ylabel=f"{a.metric} (validation)",
           title=textwrap.fill(", ".join(
               f"{_short(k)}={v}" for k, v in zip(a.panels, panel)), 48))
    ax.grid(True, alpha=0.3)
  handles = [plt.Line2D([], [], color=colours[line], label=_label(line))
             for line in lines]
  fig.legend(handles=handles, fontsize=7, loc="center left",
             bbox_to_anchor=(1.0, 0.5))
  fig.suptitle(f"{title}: every cell's evaluations")
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
  stale = stale_note([r for r in status["done"]])
  parts = ([stale] if stale else []) + [grid.description,
                                         _setup(grid, preset, status)]
  if status["done"]:
    plot, curves = f"{grid.name}.png", f"{grid.name}_curves.png"
    sweep_plot(os.path.join(folder, plot), rows, a, grid.title)
    curves_plot(os.path.join(folder, curves), records, a, grid.title)
    parts += [sweep_tables(rows, a), f"![{grid.name}]({plot})",
              f"![{grid.name} curves]({curves})"]
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
  splits = _unique(r.get("value_split", "eval") for r in status["done"])
  value = ("the test split's metric at the last step (`test_*`)"
           if splits == ["test"] else f"the last logged `{a.metric}`")
  best = (f" For each row the best {', '.join(_short(k) for k in a.best_over)}"
          " is kept, chosen by the mean over seeds of the last validation "
          "evaluation" + (", not the reported test metric." if splits == [
              "test"] else " (the reported metric itself: optimistic by the "
              "selection).") if a.best_over else "")
  return (
      f"Preset `{preset}`; cells: {products}; everything else from the base "
      f"config (raw.json `base_config`). Value of a cell: {value} "
      f"({'higher' if a.higher_is_better else 'lower'} is "
      "better); tables give the mean ± 95% Student-t interval over seeds "
      f"(n seeds, n - 1 degrees of freedom) and plots every seed's point."
      f"{best} Keys/query and decode state are each attention stack's "
      "`zoo.layers.stack_budget` at the cell's length. Ran on: "
      f"{', '.join(devices) or '-'}.\n\nCells: {len(status['done'])} done, "
      f"{len(status['failed'])} failed, "
      f"{len(status['interrupted']) + len(status['pending'])} not finished.")
