"""The robustness study (benchmarks/robustness.py) at a tiny size through the real entry points: the
files it writes, its summary against the per-seed numbers, a rerun that reuses every stage, and the
folders and flags it refuses."""
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import SAFETY_LIMIT, wait_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import robustness  # noqa: E402
from scdm.checkpoint import checkpoint_steps  # noqa: E402

TINY = ["--budget", "tiny", "--models", "sdm", "scdm_classwise", "--seeds", "0", "1", "--noises", "edge",
        "--num_test", "2", "--lpips_weights", "random", "--jobs", "2"]


def run_study(out, *extra):
    args = robustness.build_parser().parse_args(TINY + ["--out_dir", str(out), *extra])
    cfg = robustness.resolve_config(args)
    cfg.update(out=None, grid=None, lpips_weights=args.lpips_weights)
    return robustness.run(cfg, fresh=args.fresh)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    return out, run_study(out)


def test_writes_every_output_with_every_per_seed_number(study):
    out, report = study
    written = json.loads((out / "robustness.json").read_text())
    assert written["summary"] == json.loads(json.dumps(report["summary"]))
    assert written["code"]["git_commit"] and written["code"]["git_dirty"] in (True, False)
    assert written["machine"]["cpus_usable"] >= 1
    ids = [v["id"] for v in written["variants"]]
    assert ids == ["sdm", "scdm_classwise", "scdm_classwise_unlabeled_class"]
    assert {v["id"]: v["unlabeled_to_zero"] for v in written["variants"]} == {
        "sdm": False, "scdm_classwise": True, "scdm_classwise_unlabeled_class": False}
    for vid in ids:
        for noise in ("clean", "edge"):
            seeds = written["per_seed"][vid][noise]
            assert sorted(seeds) == ["0", "1"]
            for r in seeds.values():
                assert 0 <= r["miou"] <= 1 and r["lpips"] is not None and r["lpips"] >= 0
            # the summary is the mean and sample std of the per-seed numbers
            row = written["summary"][vid][noise]
            mious = [r["miou"] for r in seeds.values()]
            assert row["miou_mean"] == pytest.approx(statistics.mean(mious))
            assert row["miou_std"] == pytest.approx(statistics.stdev(mious))
            assert (out / "samples" / vid / "seed1" / noise / "samples_1" / "00001.png").is_file()
    paired = written["paired_vs_sdm"]["scdm_classwise"]["edge"]
    diffs = [written["per_seed"]["scdm_classwise"]["edge"][s]["miou"] - written["per_seed"]["sdm"]["edge"][s]["miou"]
             for s in ("0", "1")]
    assert paired["miou_diff_mean"] == pytest.approx(statistics.mean(diffs))
    assert paired["miou_wins"] == sum(d > 0 for d in diffs)
    # two SCDM runs sampled the same checkpoint, differing only in how unlabeled pixels were fed
    key = json.loads((out / "stages" / "sample_scdm_class_wise_seed_0_on_edge.json").read_text())["key"]
    key_class = json.loads((out / "stages" / "sample_scdm_class_wise_holes_as_class_seed_0_on_edge.json")
                           .read_text())["key"]
    assert key["model"] == key_class["model"] and (key["unlabeled_to_zero"], key_class["unlabeled_to_zero"]) == (True,
                                                                                                                 False)
    md = (out / "results.md").read_text()
    sdm_clean = written["summary"]["sdm"]["clean"]
    assert f"{100 * sdm_clean['miou_mean']:.1f} ± {100 * sdm_clean['miou_std']:.1f}" in md
    with Image.open(out / "grid.png") as grid:  # 2 label columns + 3 models; 2 maps x 2 noises
        assert grid.size == (70 + 5 * 68, 32 + 2 * (2 * 68 + 8))


def test_rerun_reuses_every_stage_and_scores_the_same(study):
    out, report = study
    again = run_study(out)
    assert again["seconds"]["stages"] and all(v is None for v in again["seconds"]["stages"].values())
    assert again["per_seed"] == report["per_seed"]


def test_refuses_foreign_folder_and_changed_training(study, tmp_path):
    out, _ = study
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(robustness.StudyError, match="holds no study.json"):
        run_study(foreign)
    assert (foreign / "mine.txt").read_text() == "keep" and len(list(foreign.iterdir())) == 1
    (foreign / "study.json").write_text('{"my": "study notes"}')  # a study.json, but not this tool's
    with pytest.raises(robustness.StudyError, match="holds no study.json"):
        run_study(foreign, "--fresh")
    assert (foreign / "mine.txt").read_text() == "keep"
    with pytest.raises(robustness.StudyError, match=r"other settings \(lr 0.0005 -> 0.002\)"):
        run_study(out, "--lr", "0.002")


@pytest.mark.parametrize("flags, message", [
    (["--num_test", "9"], "--num_test 9: at most num_train 8"),
    (["--seeds", "-1"], "--seeds"),
    (["--models", "gan"], "--models"),
    (["--jobs", "0"], "--jobs"),
    (["--lpips_weights", "/no/alexnet.pth"], "--lpips_weights /no/alexnet.pth: file not found"),
])
def test_bad_flags(flags, message, tmp_path, capsys):
    with pytest.raises((robustness.StudyError, SystemExit)) as e:
        robustness.main(["--budget", "tiny", "--out_dir", str(tmp_path / "x"), *flags])
    text = str(e.value) if isinstance(e.value, robustness.StudyError) else capsys.readouterr().err
    assert message in text
    assert not (tmp_path / "x").exists()


def test_stop_signal_stops_the_running_training_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "benchmarks" / "robustness.py"), "--budget", "tiny", "--models", "sdm",
           "--seeds", "0", "--noises", "edge", "--steps", "2000", "--jobs", "1", "--out_dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    progress = out / "train" / "sdm_seed0" / "progress.csv"
    wait_for(progress.is_file, proc, f"training's first logged step ({progress})")
    # SIGTERM, as a cluster or `kill` sends it (a shell's background job ignores SIGINT, so CI can't use it)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=SAFETY_LIMIT)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # the shell convention for SIGTERM
    assert "interrupted; rerun the same command to continue" in err
    assert "stopped by SIGTERM at step" in err  # the training child saved before it stopped
    steps = checkpoint_steps(out / "train" / "sdm_seed0")
    assert steps and steps[-1] < 2000
    marker = json.loads((out / "stages" / "train_sdm_seed_0.json").read_text())
    assert marker["complete"] is False  # a rerun resumes it instead of counting it done
