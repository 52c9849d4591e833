"""Scaling laws per attention family on byte-level text: eval loss against
non-embedding parameters N and training tokens D, power laws fitted with
bootstrap intervals, and an iso-FLOP view.

  python -m experiments.sweep \
      --grid=experiments/grids/scaling.py:/path/to/file.txt
  python -m experiments.sweep \
      --grid=experiments/grids/scaling.py:/path/to/file.txt --preset=quick \
      --out=/tmp/scaling

Design. Each (family, width, seed) is one run at a constant learning rate
after warmup (`lr_schedule=constant`), evaluated every 1/16 of its steps;
the loss at D training tokens is that run's eval loss at step D / (tokens
per step), the learning-curve reading of Kaplan et al. (2020). A constant
rate makes every point of a curve the same recipe; under a cosine schedule
the early points would be runs cut short mid-decay, the bias Chinchilla
(Hoffmann et al. 2022) avoids by one run per D at several times the cost.
Widths vary at fixed depth, the MLP 4x the width and heads of 16 dims
(the narrowest width, 24, has one head); N counts the blocks and final
norm (zoo.models.transformer.parameter_counts): 14k to 222k at the CPU
preset (16x), D from 164k to 2.6M tokens (16x, up to 2.6 passes over
tinyshakespeare's 1M training bytes). One learning rate for every size (not tuned per
size, as both papers do). Loss is eval bits per byte; exponents do not
depend on the unit (nats = bits x ln 2 for E).

Fits, per attention family, by robust least squares on log L (Huber,
delta 1e-3, several starts; the Chinchilla procedure):
- L(N) = E + A N^-a over every run's last eval loss;
- L(D) = E + B D^-b over the largest model's curves;
- L(N, D) = E + A N^-a + B D^-b over every curve point of every run;
- the raw log-log slopes (Kaplan's form, no E) of the same points.
95% intervals: percentiles of 1000 bootstrap refits, resampling whole
runs (their curve points move together) with replacement.
Iso-FLOP: for compute budgets C = 6 N D (Kaplan's non-embedding training
FLOPs), each run's loss at D = C / 6N (interpolated along its curve in log
D, where inside it), loss against N, and the N of least loss (a parabola
in log N through the sizes' mean losses).
"""

import dataclasses
import os

import numpy as np
from scipy import optimize

from configs import text as text_config
from experiments import grids, report

FAMILIES = ["standard", "local", "linear(feature='elu')"]

# (layers, widths, steps, batch, seq_len, seeds, learning rate, key budget)
SIZES = {"quick": (1, [16, 24, 32], 16, 32, 32, [0, 1], 3e-3, 8),
         "cpu": (2, [24, 32, 48, 64, 96], 640, 32, 128, [0, 1], 2e-3, 32),
         "full": (6, [128, 192, 256, 384, 512, 768], 20000, 64, 1024,
                  [0, 1, 2], 1e-3, 256)}
EVALS = 16  # evaluations per run: D spans 16x
BOOTSTRAP = 1000

# Published exponents (loss against N and D), as the papers report them.
PUBLISHED = [
    ("Kaplan et al. 2020, raw slopes (no E)", "0.076", "0.095"),
    ("Chinchilla (Hoffmann et al. 2022), with E = 1.69 nats", "0.34",
     "0.28")]


def get_grid(preset: str, text_path: str = "") -> grids.Grid:
  if not text_path:
    raise ValueError("the scaling grid needs a file: "
                     "--grid=experiments/grids/scaling.py:PATH")
  layers, widths, steps, batch, seq_len, seeds, lr, keys = SIZES[preset]
  config = text_config.get_config(text_path)
  config.num_train_steps = steps
  config.batch_size = batch
  config.learning_rate = lr
  config.lr_schedule = "constant"
  config.warmup_steps = max(1, steps // (2 * EVALS))
  config.log_every_steps = steps // EVALS
  config.eval_every_steps = steps // EVALS
  config.checkpoint_every_steps = max(1, steps // 4)
  config.max_checkpoints_to_keep = 1
  config.data.seq_len = seq_len

  def derive(c):
    grids.set_model(c, layers=layers, width=c.model.embed_dim,
                    heads=max(1, c.model.embed_dim // 16))
    c.model.attention = grids.at_budget(c.model.attention, keys, seq_len,
                                        causal=True)

  return grids.Grid(
      name="scaling", title="Scaling laws per attention family",
      description=(__doc__.split("\n\n", 1)[0].replace("\n", " ")
                   + f" Text: `{text_path}`."),
      base=config,
      axes={"model.attention": FAMILIES, "model.embed_dim": widths,
            "seed": seeds},
      analysis=grids.Analysis(
          metric="eval_bits_per_token", higher_is_better=False,
          line=("model.attention",), x="model.embed_dim"),
      derive=derive, analyze=analyze)


@dataclasses.dataclass
class Run:
  """One finished cell: its family, non-embedding parameters, and eval
  loss at each token count of its curve."""

  family: str
  n: float
  d: np.ndarray
  loss: np.ndarray


def runs_of(records: list[dict]) -> list[Run]:
  return [Run(r["axes"]["model.attention"],
              float(r["params"]["non_embedding"]),
              np.array([s * r["tokens_per_step"] for s, _, _ in r["curve"]],
                       float),
              np.array([v for _, _, v in r["curve"]], float))
          for r in records if r["status"] == "done"]


def _law(log_terms, params):
  """log(E + sum_i exp(log_coef_i - exponent_i * log_x_i))."""
  e, rest = params[0], params[1:]
  total = e + sum(np.exp(rest[2 * i] - rest[2 * i + 1] * lx)
                  for i, lx in enumerate(log_terms))
  return np.log(total)


def fit_law(xs: list[np.ndarray], loss: np.ndarray, start=None) -> np.ndarray:
  """Fits L = E + sum_i C_i x_i^-k_i to `loss` (Huber on log L, delta
  1e-3) from several starts, or from `start` alone; returns [E, log C_1,
  k_1, ...] with x_i taken relative to its smallest value."""
  logs = [np.log(x / x.min()) for x in xs]
  target = np.log(loss)

  def residual(p):
    return _law(logs, p) - target

  lower = [0.0] + [-20.0, 0.0] * len(xs)
  upper = [loss.min() * (1 - 1e-9)] + [20.0, 3.0] * len(xs)
  if start is not None:
    starts = [np.clip(start, lower, upper)]
  else:
    starts = []
    for e in (0.0, 0.5, 0.9):
      for k in (0.1, 0.3, 0.7):
        coef = np.log(max(loss.max() - e * loss.min(), 1e-6) / len(xs))
        starts.append(np.array([e * loss.min()] + [coef, k] * len(xs)))
  best = None
  for x0 in starts:
    fit = optimize.least_squares(residual, x0, bounds=(lower, upper),
                                 loss="huber", f_scale=1e-3)
    if best is None or fit.cost < best.cost:
      best = fit
  return best.x


def raw_slope(x: np.ndarray, loss: np.ndarray) -> float:
  """-d log L / d log x by least squares (Kaplan's form, no E)."""
  return -np.polyfit(np.log(x), np.log(loss), 1)[0]


def _points(runs: list[Run], which: str):
  """The (x arrays, loss) a fit takes from `runs`: last points (N), the
  largest model's curves (D) or every point (N, D)."""
  if which == "N":
    return [np.array([r.n for r in runs])], np.array([r.loss[-1]
                                                      for r in runs])
  if which == "D":
    big = [r for r in runs if r.n == max(q.n for q in runs)]
    return [np.concatenate([r.d for r in big])], np.concatenate(
        [r.loss for r in big])
  return ([np.concatenate([np.full(len(r.d), r.n) for r in runs]),
           np.concatenate([r.d for r in runs])],
          np.concatenate([r.loss for r in runs]))


def fit_family(runs: list[Run], seed: int = 0) -> dict:
  """Point estimates and bootstrap 95% intervals of the exponents of
  L(N), L(D), L(N, D) and the raw slopes. The bootstrap resamples runs
  (for L(D), the largest model's runs); a resample with fewer than 3
  distinct sizes (2 token counts for D) is skipped and counted."""
  rng = np.random.default_rng(seed)
  out = {}
  for which, names in (("N", ["a"]), ("D", ["b"]), ("ND", ["a", "b"])):
    pool = runs if which != "D" else [r for r in runs
                                      if r.n == max(q.n for q in runs)]
    xs, loss = _points(pool, which)
    point = fit_law(xs, loss)
    slopes = ([raw_slope(xs[0], loss)] if which != "ND" else [])
    samples, skipped = [], 0
    # Resampling fewer than 3 runs gives no interval worth the name.
    for _ in range(BOOTSTRAP if len(pool) >= 3 else 0):
      pick = [pool[i] for i in rng.integers(len(pool), size=len(pool))]
      bxs, bloss = _points(pick, which)
      if len({float(v) for v in bxs[0]}) < (3 if which != "D" else 2) or (
          which == "ND" and len({r.n for r in pick}) < 3):
        skipped += 1
        continue
      p = fit_law(bxs, bloss, start=point)
      samples.append([p[2 + 2 * i] for i in range(len(names))]
                     + ([raw_slope(bxs[0], bloss)] if slopes else []))
    samples = np.array(samples)
    entry = {"E": point[0], "log_coef": point[1], "runs": len(pool),
             "points": len(loss),
             "bootstrap": len(samples), "skipped": skipped}
    for i, name in enumerate(names + (["raw"] if slopes else [])):
      value = (point[2 + 2 * i] if name != "raw" else slopes[0])
      lo, hi = (np.percentile(samples[:, i], [2.5, 97.5]) if len(samples)
                else (np.nan, np.nan))
      entry[name] = (float(value), float(lo), float(hi))
    out[which] = entry
  return out


def iso_flop(runs: list[Run], budgets: list[float]) -> list[dict]:
  """For each compute budget C: per model size the mean (and n) over
  seeds of the loss at D = C / 6N, read off each run's curve by
  interpolation in log D where C / 6N lies inside it; the N of least loss
  (vertex of a parabola in log N through the least-loss size and its
  neighbours, else that size) and whether it is at the edge of the sizes."""
  out = []
  for c in budgets:
    by_n = {}
    for r in runs:
      d = c / (6 * r.n)
      if r.d[0] <= d <= r.d[-1]:
        by_n.setdefault(r.n, []).append(
            float(np.interp(np.log(d), np.log(r.d), r.loss)))
    sizes = sorted(by_n)
    means = [float(np.mean(by_n[n])) for n in sizes]
    entry = {"C": c, "N": sizes, "loss": means,
             "seeds": [len(by_n[n]) for n in sizes]}
    if len(sizes) >= 3:
      i = int(np.argmin(means))
      entry["edge"] = i in (0, len(sizes) - 1)
      j = min(max(i, 1), len(sizes) - 2)
      x = np.log(sizes[j - 1:j + 2])
      a, b, _ = np.polyfit(x, means[j - 1:j + 2], 2)
      vertex = -b / (2 * a) if a > 0 else x[1 if not entry["edge"] else 0]
      entry["best_N"] = float(np.exp(np.clip(vertex, np.log(sizes[0]),
                                             np.log(sizes[-1]))))
    out.append(entry)
  return out


def budgets(runs: list[Run]) -> list[float]:
  """Three compute budgets a factor 4 apart around the middle of the
  grid (geometric mean of the sizes times that of the token counts)."""
  n = np.array(sorted({r.n for r in runs}))
  d = runs[0].d
  middle = 6 * np.exp(np.log(n).mean()) * np.exp(np.log(d).mean())
  return [middle / 4, middle, middle * 4]


def _ci(value, runs: int) -> str:
  v, lo, hi = value
  if np.isnan(lo):
    return f"{v:.3f} (no interval: {runs} run{'s' * (runs != 1)})"
  return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def analyze(records: list[dict], folder: str) -> str:
  """The fits, the iso-FLOP table and scaling.png's companion plot
  scaling_fits.png (markdown for RESULTS.md)."""
  runs = runs_of(records)
  families = [f for f in FAMILIES if any(r.family == f for r in runs)]
  fits, skipped = {}, []
  for f in families:
    mine = [r for r in runs if r.family == f]
    if len({r.n for r in mine}) >= 3:
      fits[f] = fit_family(mine)
    else:
      skipped.append(f"{f} ({len({r.n for r in mine})} sizes finished)")
  parts = ["## Fitted scaling laws",
           "Exponents with bootstrap 95% intervals (percentiles of "
           f"{BOOTSTRAP} refits resampling runs; none from fewer than 3 "
           "runs: L(D) uses the largest model's runs alone, one per seed); "
           "E in bits per byte. `a` is the exponent on N, `b` on D."]
  rows = []
  for f, fit in fits.items():
    n, d, nd = (fit[k]["runs"] for k in ("N", "D", "ND"))
    rows.append([f, _ci(fit["N"]["a"], n), _ci(fit["N"]["raw"], n),
                 _ci(fit["D"]["b"], d), _ci(fit["D"]["raw"], d),
                 _ci(fit["ND"]["a"], nd), _ci(fit["ND"]["b"], nd),
                 f"{fit['ND']['E']:.3f}",
                 f"{fit['N']['runs']} / {fit['D']['runs']} / "
                 f"{fit['ND']['points']}"])
  parts.append(report.markdown_table(
      ["family", "L(N): a", "L(N): raw slope", "L(D): b", "L(D): raw slope",
       "L(N,D): a", "L(N,D): b", "L(N,D): E", "runs N / runs D / points"],
      rows))
  if skipped:
    parts.append("Not fitted (fewer than 3 sizes): " + ", ".join(skipped))
  parts.append("Published, for comparison (their N from about 1e5 to 1e9 "
               "and more, D to 1e11 tokens and more; what differs at this "
               "scale is read in experiments/results/FINDINGS.md, 'Scaling'):\n\n"
               + report.markdown_table(["source", "exponent on N",
                                        "exponent on D"],
                                       [list(p) for p in PUBLISHED]))
  iso = {}
  if runs:
    parts.append("## Iso-FLOP view\n\nLoss at equal compute C = 6ND "
                 "(mean over seeds, n seeds in brackets), and the N of least "
                 "loss.")
    for f in families:
      iso[f] = iso_flop([r for r in runs if r.family == f], budgets(runs))
      table = []
      for e in iso[f]:
        cells = ", ".join(f"{n:.3g}: {l:.3f} ({k})" for n, l, k in
                          zip(e["N"], e["loss"], e["seeds"]))
        best = (f"{e['best_N']:.3g}" + (" (at the edge)" if e["edge"]
                                         else "")
                if "best_N" in e else "fewer than 3 sizes")
        table.append([f"{e['C']:.3g}", cells or "-", best])
      parts.append(f"**{f}**\n\n" + report.markdown_table(
          ["C (FLOPs)", "N: loss (seeds)", "N of least loss"], table))
  _plot(os.path.join(folder, "scaling_fits.png"), runs, fits, iso)
  parts.append("![fits](scaling_fits.png)")
  return "\n\n".join(parts)


def _plot(path: str, runs: list[Run], fits: dict, iso: dict):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  colors = dict(zip(FAMILIES, ["C0", "C1", "C2"]))
  for f in colors:
    mine = [r for r in runs if r.family == f]
    if not mine:
      continue
    ns = sorted({r.n for r in mine})
    last = [[r.loss[-1] for r in mine if r.n == n] for n in ns]
    axes[0].errorbar(ns, [np.mean(v) for v in last],
                     yerr=[report.mean_ci(v)[1] if len(v) > 1 else 0
                           for v in last],
                     fmt="o", color=colors[f], capsize=3, label=f)
    big = [r for r in mine if r.n == ns[-1]]
    axes[1].plot(big[0].d, np.mean([r.loss for r in big], 0), "o",
                 color=colors[f], label=f"{f} (N={ns[-1]:.3g})")
    if f in fits:
      e, c, k = fits[f]["N"]["E"], *_coef(fits[f], "N", min(ns))
      grid_n = np.geomspace(ns[0], ns[-1], 50)
      axes[0].plot(grid_n, e + c * grid_n ** -k, color=colors[f])
      e, c, k = fits[f]["D"]["E"], *_coef(fits[f], "D", big[0].d.min())
      axes[1].plot(big[0].d, e + c * big[0].d ** -k, color=colors[f])
      a, lo, hi = fits[f]["ND"]["a"]
      b, blo, bhi = fits[f]["ND"]["b"]
      i = FAMILIES.index(f)
      axes[3].errorbar([i - 0.1], [a], yerr=[[a - lo], [hi - a]], fmt="o",
                       color=colors[f], capsize=3)
      axes[3].errorbar([i + 0.1], [b], yerr=[[b - blo], [bhi - b]], fmt="s",
                       color=colors[f], capsize=3, mfc="white")
    for e, style in zip(iso.get(f, []), [":", "--", "-"]):
      if e["N"]:
        axes[2].plot(e["N"], e["loss"], style, marker="o", color=colors[f],
                     label=f"{f}, C={e['C']:.2g}")
  axes[0].set(xscale="log", xlabel="non-embedding parameters N",
              ylabel="eval bits per byte", title="L(N), last eval (fit: line)")
  axes[1].set(xscale="log", xlabel="training tokens D",
              ylabel="eval bits per byte", title="L(D), largest model")
  axes[2].set(xscale="log", xlabel="N", ylabel="eval bits per byte",
              title="iso-FLOP: loss at C = 6ND")
  axes[3].set_xticks(range(len(FAMILIES)), FAMILIES, rotation=20, fontsize=8)
  axes[3].set(ylabel="exponent (95% bootstrap)",
              title="L(N,D): a (circle), b (square)")
  for ax in axes:
    ax.grid(True, alpha=0.3)
  for ax in axes[:3]:
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _coef(fit: dict, which: str, x_min: float) -> tuple[float, float]:
  """(C, k) of C x^-k in x's own units, from a fit relative to x_min."""
  k = fit[which]["a" if which == "N" else "b"][0]
  return np.exp(fit[which]["log_coef"]) * x_min ** k, k
