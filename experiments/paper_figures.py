"""The focal loss paper's Figures 1 and 4, from the formula and from a converged model.

    python -m experiments.paper_figures --workdir runs/demo --out experiments/results

Figure 1: the loss against the probability of the ground-truth class,
`FL(p_t) = -(1 - p_t)**gamma log(p_t)`, for gamma in {0, 0.5, 1, 2, 5}.

Figure 4: for a converged model (a work dir trained with the focal loss), the
cumulative distribution of the normalized loss over its positive and over its
negative anchors on the held-out images, for gamma in {0, 0.5, 1, 2}. As in
the paper: each anchor's loss (summed over the classes, without alpha, which
scales a whole group and cancels in the normalization) is computed from the
model's logits, the losses of a group are sorted from lowest to highest and
normalized to sum to one, and the curve gives the share of the group's loss
(y) carried by the fraction x of its anchors with the lowest loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FIGURE1_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
FIGURE4_GAMMAS = (0.0, 0.5, 1.0, 2.0)


def focal_loss_of_p_t(p_t: np.ndarray, gamma: float) -> np.ndarray:
  """`-(1 - p_t)**gamma log(p_t)` (the paper's eq. 4 without alpha), float64."""
  p_t = np.asarray(p_t, np.float64)
  return -((1 - p_t) ** gamma) * np.log(p_t)


def normalized_loss_cdf(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(fraction of samples, cumulative normalized loss)` of a group, from the lowest loss up.

  Point `i` (from 1) is `(i / n, sum of the i lowest losses / sum of all)`; the
  curve ends at (1, 1). A group of zero total loss is a diagonal.
  """
  losses = np.sort(np.asarray(losses, np.float64).ravel())
  if losses.size == 0:
    raise ValueError("a group without samples has no loss distribution.")
  fraction = np.arange(1, losses.size + 1) / losses.size
  total = losses.sum()
  return fraction, (np.cumsum(losses) / total if total > 0 else fraction)


def anchor_losses(workdir: str | Path, gammas=FIGURE4_GAMMAS) -> dict[float, dict[str, np.ndarray]]:
  """`{gamma: {"positive": losses, "negative": losses}}` of a work dir's model on its held-out images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from focal_jax import focal_loss  # pylint: disable=g-import-not-at-top
  from focal_jax.data import build_eval_dataset  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.config import model_from_config  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.workdir import Workdir  # pylint: disable=g-import-not-at-top
  from focal_jax.ops.anchors import generate_anchors  # pylint: disable=g-import-not-at-top
  from focal_jax.ops.matching import batch_match_anchors  # pylint: disable=g-import-not-at-top

  run = Workdir(workdir)
  config = run.read_config()
  model = model_from_config(config)
  variables, _ = run.restore_variables()
  variables.setdefault("batch_stats", {})
  anchors = generate_anchors(config.data.padded_size, config.anchors)
  loss = config.loss

  @jax.jit
  def per_anchor(images, boxes, classes, valid):
    logits, _ = model.apply(variables, images, train=False)
    matched, _ = batch_match_anchors(anchors, boxes, classes, valid, foreground_iou=loss.foreground_iou,
                                     background_iou=loss.background_iou,
                                     allow_low_quality=loss.allow_low_quality)
    targets = (matched[..., None] == jnp.arange(logits.shape[-1])).astype(jnp.float32)
    losses = {gamma: focal_loss(logits, targets, alpha=None, gamma=gamma).sum(-1) for gamma in gammas}
    return losses, matched

  groups = {gamma: {"positive": [], "negative": []} for gamma in gammas}
  for batch in build_eval_dataset(config.data):
    losses, matched = jax.device_get(per_anchor(batch["images"], batch["boxes"], batch["classes"],
                                                batch["valid"]))
    real = ~np.asarray(batch["is_padding"])
    for gamma in gammas:
      groups[gamma]["positive"].append(losses[gamma][real][matched[real] >= 0])
      groups[gamma]["negative"].append(losses[gamma][real][matched[real] == -1])
  return {gamma: {name: np.concatenate(parts) for name, parts in group.items()} for gamma, group in groups.items()}


def figure1(path: Path) -> None:
  """The loss against p_t for each gamma (analytic)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  p_t = np.linspace(0.001, 1.0, 1000)
  figure, axes = pyplot.subplots(figsize=(6, 4.5))
  for gamma in FIGURE1_GAMMAS:
    axes.plot(p_t, focal_loss_of_p_t(p_t, gamma), label=f"gamma = {gamma:g}")
  axes.axvspan(0.6, 1.0, color="0.9")
  axes.text(0.62, 4.2, "well-classified\nexamples")
  axes.set(xlabel="probability of the ground-truth class", ylabel="loss", ylim=(0, 5), xlim=(0, 1),
           title="Figure 1: focal loss FL(p_t) = -(1 - p_t)^gamma log(p_t)")
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)


def figure4(groups: dict[float, dict[str, np.ndarray]], path: Path, source: str) -> dict:
  """The two CDF panels; returns the numbers behind them (counts, share of loss in the hardest 20%)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  figure, panels = pyplot.subplots(1, 2, figsize=(11, 4.5))
  numbers = {}
  for panel, name in zip(panels, ("positive", "negative")):
    for gamma, group in groups.items():
      fraction, cdf = normalized_loss_cdf(group[name])
      panel.plot(fraction, cdf, label=f"gamma = {gamma:g}")
      hardest = 1 - np.interp(0.8, fraction, cdf)
      numbers.setdefault(name, {})[f"{gamma:g}"] = {"samples": int(group[name].size),
                                                    "loss share of the hardest 20%": round(float(hardest), 4)}
    panel.set(xlabel=f"fraction of {name} samples", ylabel="cumulative normalized loss", xlim=(0, 1),
              ylim=(0, 1), title=f"{name} samples ({next(iter(groups.values()))[name].size:,})")
    panel.legend(loc="upper left")
  figure.suptitle(f"Figure 4: normalized loss CDF of a converged model ({source})")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)
  return numbers


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.paper_figures", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a work dir of a converged focal-loss model (Figure 4)")
  parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                      help="where figure_1.png, figure_4.png and figure_4.json go")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
  args = parser.parse_args(argv)
  from focal_jax._cli import run_command  # pylint: disable=g-import-not-at-top

  def run() -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure1(out / "figure_1.png")
    numbers = figure4(anchor_losses(args.workdir), out / "figure_4.png", Path(args.workdir).name)
    (out / "figure_4.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(json.dumps(numbers, indent=2))
    return 0

  return run_command(run, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
