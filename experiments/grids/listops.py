"""ListOps (the Long Range Arena design, CPU-sized): every attention family
on the same encoder, at matched key budgets, against LRA's published
accuracies (Tay et al. 2021, Table 1).

  python -m experiments.sweep --grid=experiments/grids/listops.py
  python -m experiments.sweep --grid=experiments/grids/listops.py \
      --preset=quick --out=/tmp/listops

LRA trains on its released files at length 2000 (the `full` preset's
shape; point `data.task` at them with `listops(path=DIR)`); the CPU
presets generate expressions with the same generator up to
`data.seq_len` tokens. Local, sparse and bigbird get window / block sizes
whose keys per query are closest to KEYS[preset] (`grids.at_budget`);
dense and linear attention see every key. Chance is about 17%: the
share of the most common label.
"""

from configs import listops as listops_config
from experiments import grids

FAMILIES = ["standard", "local", "sparse", "bigbird",
            "linear(feature='elu')", "linear(feature='favor')"]

# LRA Table 1, ListOps test accuracy, by our family.
LRA = {"standard": ("Transformer", 0.3637), "local": ("Local Att", 0.1582),
       "sparse": ("Sparse Trans.", 0.1707), "bigbird": ("BigBird", 0.3605),
       "linear(feature='elu')": ("Linear Trans.", 0.1613),
       "linear(feature='favor')": ("Performer", 0.1801)}

# (seq_len, layers, width, heads, steps, batch, training examples)
SIZES = {"quick": (64, 1, 32, 2, 30, 16, 1000),
         "cpu": (128, 2, 64, 4, 1000, 32, 20000),
         "full": (2048, 4, 512, 8, 5000, 32, 96000)}
KEYS = {"quick": 16, "cpu": 32, "full": 256}


def get_grid(preset: str) -> grids.Grid:
  seq_len, layers, width, heads, steps, batch, examples = SIZES[preset]
  config = listops_config.get_config()
  config.num_train_steps = steps
  config.batch_size = batch
  config.warmup_steps = max(1, steps // 10)
  config.log_every_steps = max(1, steps // 10)
  config.eval_every_steps = max(1, steps // 5)
  config.checkpoint_every_steps = max(1, steps // 4)
  config.max_checkpoints_to_keep = 1
  m = config.model
  m.num_layers, m.embed_dim, m.mlp_dim = layers, width, 4 * width
  m.num_heads = m.num_kv_heads = heads
  config.data.seq_len = seq_len
  config.data.task = f"listops(num_train={examples}, num_eval=1000)"

  def derive(c):
    c.model.attention = grids.at_budget(c.model.attention, KEYS[preset],
                                        c.data.seq_len, causal=False)

  return grids.Grid(
      name="listops", title="ListOps accuracy per attention family",
      description=__doc__.split("\n\n", 1)[0].replace("\n", " "),
      base=config,
      axes={"model.attention": FAMILIES, "seed": [0, 1, 2]},
      analysis=grids.Analysis(
          metric="eval_accuracy", line=("model.attention",), reference=LRA,
          reference_source="LRA, Tay et al. 2021, length 2000"),
      derive=derive)
