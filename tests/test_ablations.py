"""Tests of experiments.ablations and experiments.paper_figures on tiny runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_demo_config
from experiments import ablations, configs, paper_figures
import focal_jax.engine.loop as train_loop


def test_normalized_loss_cdf_by_hand():
  fraction, cdf = paper_figures.normalized_loss_cdf(np.array([3.0, 1.0, 0.0, 4.0]))
  np.testing.assert_allclose(fraction, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(cdf, [0.0, 1 / 8, 4 / 8, 1.0])  # sorted 0, 1, 3, 4 of a total of 8
  fraction, cdf = paper_figures.normalized_loss_cdf(np.zeros(4))
  np.testing.assert_allclose(cdf, fraction)
  with pytest.raises(ValueError, match="without samples"):
    paper_figures.normalized_loss_cdf(np.array([]))


def test_figure_1_formula_by_hand():
  assert paper_figures.focal_loss_of_p_t(0.5, 0.0) == pytest.approx(math.log(2))
  assert paper_figures.focal_loss_of_p_t(0.5, 2.0) == pytest.approx(0.25 * math.log(2))
  assert paper_figures.focal_loss_of_p_t(0.9, 5.0) == pytest.approx(0.1 ** 5 * -math.log(0.9))


@pytest.fixture
def tiny_tables(monkeypatch, synthetic_data_dir):
  """A two-row table on the demo model at 64x64 on synthetic_shapes/tiny, and a table OHEM cannot fit."""
  tiny = tiny_demo_config(synthetic_data_dir)
  monkeypatch.setattr(configs, "get_config", lambda name: tiny)
  monkeypatch.setitem(ablations.TABLES, "tiny", [("CE, alpha=0.75", ["loss.gamma=0.0", "loss.alpha=0.75"]),
                                                 ("OHEM, B=64, 1:3", ablations._ohem(64, 0.25))])
  monkeypatch.setitem(ablations.TABLES, "too_big", [("OHEM, B=10000", ablations._ohem(10000, None))])
  import jax  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.mesh import make_mesh  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(train_loop, "make_mesh", lambda: make_mesh(jax.devices()[:1]))


@pytest.mark.slow
def test_a_two_row_table_runs_resumes_and_refuses_what_does_not_fit(tiny_tables, tmp_path, monkeypatch):
  workdirs, results = tmp_path / "runs", tmp_path / "results"
  summary = ablations.run_table("tiny", [0], 2, workdirs, results)
  assert [row["row"] for row in summary["rows"]] == ["CE, alpha=0.75", "OHEM, B=64, 1:3"]
  saved = json.loads((results / "tiny.json").read_text())
  assert saved["table"] == "tiny" and saved["steps"] == 2 and len(saved["rows"]) == 2
  for row in saved["rows"]:
    assert 0.0 <= row["AP"]["mean"] <= 1.0 and row["AP"]["per_seed"] == [row["AP"]["mean"]]
    assert row["wall_seconds"] > 0
  table = (results / "tiny.md").read_text()
  assert "| OHEM, B=64, 1:3 |" in table and "python -m experiments.ablations tiny --seeds 0 --steps 2" in table
  run = json.loads((workdirs / "tiny" / "row_1" / "seed_0" / "config.json").read_text())
  assert run["loss"]["classification"] == "ohem" and run["loss"]["ohem_positive_fraction"] == 0.25

  # Run again: every row is read back, nothing trains.
  def no_training(*args):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(train_loop, "train_and_evaluate", no_training)
  assert ablations.run_table("tiny", [0], 2, workdirs, results) == summary
  # One row of it, read back too, into another results folder.
  [row] = ablations.run_table("tiny", [0], 2, workdirs, tmp_path / "one_row", rows=[1])["rows"]
  assert row == summary["rows"][1]
  assert "experiments.ablations tiny --rows 1 --seeds 0 --steps 2" in (tmp_path / "one_row" / "tiny.md").read_text()

  # A run whose loss becomes non-finite is a diverged row, read back as such.
  def diverging(config, workdir):
    del config
    Path(workdir).mkdir(parents=True)
    raise train_loop.NonFiniteLossError("the loss is not finite at step 2", 2)

  monkeypatch.setattr(train_loop, "train_and_evaluate", diverging)
  [row] = ablations.run_table("tiny", [0, 1], 2, tmp_path / "diverging", tmp_path / "diverged", rows=[0])["rows"]
  assert row["AP"]["per_seed"] == [0.0, 0.0] and row["diverged_at"] == {0: 2, 1: 2}
  assert "| CE, alpha=0.75 | 0.000 +- 0.000 | 0.000 +- 0.000 | 0.000 +- 0.000 | 0: 2, 1: 2 | 2 |" in (
      tmp_path / "diverged" / "tiny.md").read_text()
  monkeypatch.setattr(train_loop, "train_and_evaluate", no_training)
  assert ablations.run_table("tiny", [0, 1], 2, tmp_path / "diverging", tmp_path / "diverged", rows=[0])["rows"] == [row]

  # Refused before anything runs: another schedule in the same work dirs, a batch larger than the anchors,
  # an unknown table, a results file of another table.
  with pytest.raises(ValueError, match=r"holds a run of another config \(.*train.total_steps"):
    ablations.run_table("tiny", [0], 3, workdirs, results)
  with pytest.raises(ValueError, match="loss.ohem_batch_size 10000 exceeds the 756 anchors"):
    ablations.run_table("too_big", [0], 2, workdirs, results)
  with pytest.raises(ValueError, match=r"table tiny has rows 0-1; got \[2\]"):
    ablations.run_table("tiny", [0], 2, workdirs, results, rows=[2])
  with pytest.raises(ValueError, match="unknown table 'beta'"):
    ablations.run_table("beta", [0], 2, workdirs, results)
  (results / "alpha.json").write_text(json.dumps({"table": "gamma"}))
  with pytest.raises(ValueError, match="holds the results of another table"):
    ablations.run_table("alpha", [0], 2, workdirs, results)
  assert json.loads((results / "alpha.json").read_text()) == {"table": "gamma"}

  # Figure 4 from the first row's model, Figure 1 from the formula.
  groups = paper_figures.anchor_losses(workdirs / "tiny" / "row_0" / "seed_0", gammas=(0.0, 2.0))
  for gamma in (0.0, 2.0):
    assert groups[gamma]["positive"].size > 0 and groups[gamma]["negative"].size > groups[gamma]["positive"].size
  numbers = paper_figures.figure4(groups, tmp_path / "figure_4.png", "tiny")
  assert set(numbers) == {"positive", "negative"} and (tmp_path / "figure_4.png").stat().st_size > 0
  paper_figures.figure1(tmp_path / "figure_1.png")
  assert (tmp_path / "figure_1.png").stat().st_size > 0
