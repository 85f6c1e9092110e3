"""experiments/image_text_ablation.py at its smallest (--quick): each row's change is in effect
in the run it trained (the loss is the row's weighted sum, one learned scale per size), and the
tables and summary are the runs' own evaluation results."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.conftest import process_env

SCRIPT = os.path.join(REPO, "experiments", "image_text_ablation.py")


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        env=process_env(TF_CPP_MIN_LOG_LEVEL="2"), timeout=900, check=False)


@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
  work = tmp_path_factory.mktemp("image_text_ablation")
  proc = _run("--quick", "--rows=standard,mrl_both", f"--data_dir={data_dir}",
              f"--workdir={work / 'runs'}", f"--out={work / 'out'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(work / "out" / "summary.json") as f:
    return work, json.load(f)


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_each_row_trains_what_it_says(quick_run):
  """mrl_both (runlocal: sizes 8, 16, 32): loss = 1/2 loss@8 + 1/2 loss@16 + loss@32 at every
  logged step, and a learned scale per size; standard: the full size's loss and one scale."""
  work, _ = quick_run
  runs = work / "runs" / "captions_steps6_runlocal"
  both = [r for r in _records(runs / "mrl_both_seed0") if "train/loss" in r]
  assert both
  for r in both:
    want = 0.5 * r["train/loss@8"] + 0.5 * r["train/loss@16"] + r["train/loss@32"]
    assert r["train/loss"] == pytest.approx(want, rel=1e-5)
    assert {"train/scale@8", "train/scale@16", "train/scale@32"} <= set(r)
    assert "train/scale" not in r
  standard = [r for r in _records(runs / "standard_seed0") if "train/loss" in r]
  for r in standard:
    assert r["train/loss"] == pytest.approx(r["train/loss@32"], rel=1e-6)
    assert "train/scale" in r and "train/loss@8" not in r


@pytest.mark.slow
def test_tables_are_the_runs_own_results(quick_run):
  work, summary = quick_run
  text = (work / "out" / "results.md").read_text()
  for row in ("standard", "mrl_both"):
    with open(work / "runs" / "captions_steps6_runlocal" / f"{row}_seed0" / "claims_run.json") as f:
      results = json.load(f)["results"]
    assert summary["runs"][f"{row}_seed0"]["mnist_colored"] == results["mnist_colored"]["sizes"]
    for m in (8, 16, 32):  # one seed: the table's cell is the run's value
      top1 = results["mnist_colored"]["sizes"][str(m)]["zeroshot_top1"]
      line = next(l for l in text.split("## Zero-shot")[1].splitlines()
                  if l.startswith(f"| {m} |"))
      assert f"{100 * top1:.1f}" in line.split("|")[1 + ["standard", "mrl_both"].index(row) + 1]
  assert set(summary["scales"]["mrl_both"]) == {"scale@8", "scale@16", "scale@32"}
  for row in ("standard", "mrl_both"):  # a share of the squared norm, per tower
    assert set(summary["norm_share@8"][row]) == {"image", "text"}
    assert all(0 < v[0] < 1 for v in summary["norm_share@8"][row].values())
  assert np.isfinite(summary["seconds"]["standard"]).all()
  assert (work / "out" / "loss_32.png").stat().st_size > 10_000


def test_an_unknown_row_is_one_line(tmp_path):
  proc = _run("--rows=mrl,bogus", f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("--rows: unknown ['bogus']; allowed:")
  assert not os.listdir(tmp_path)
  for args, want in ((("--rows=mrl,mrl",), "--rows=mrl,mrl: a row is repeated"),
                     (("--seeds=0",), "--seeds=0; allowed: 1 or more")):
    proc = _run(*args, f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(want)
  assert not os.listdir(tmp_path)
