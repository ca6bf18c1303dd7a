"""The quickstart: its pipeline at a tiny scale through the real entry points, the done-marker that
lets reruns skip finished stages, its flags, and the image statistics it scores with."""
import ast
import json
import math
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluations import image_stats
from quickstart import config, folder, stages
from quickstart.__main__ import main
from quickstart.config import QuickstartError
from scdm.checkpoint import checkpoint_steps
from scdm.runtime.errors import UserError
from scdm.presets import PRESETS

TINY = ["--num_train", "8", "--num_test", "2", "--size", "16", "--steps", "2", "--batch_size", "2",
        "--respacing", "ddim2", "--sample_batch", "2", "--grid_maps", "1"]
REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(out, *extra):
    return config.resolve_config(config.build_parser().parse_args(TINY + ["--out_dir", str(out), *extra]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The README's first command, `sh scripts/quickstart.sh`, at a tiny scale."""
    out = tmp_path_factory.mktemp("qs") / "run"
    p = subprocess.run(["sh", str(REPO / "scripts" / "quickstart.sh"), *TINY, "--out_dir", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert str(out / "grid.png") in p.stdout + p.stderr  # it says where the results are
    return out, json.loads((out / "results.json").read_text())


def test_pipeline_writes_every_output(finished):
    out, report = finished
    for name in ("grid.png", "results.md", "results.json", "quickstart.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"].keys() == {"clean", "ds", "edge", "random"}
    for noise, per_model in on_disk["results"].items():
        assert per_model.keys() == {"sdm", "scdm"}
        for model, r in per_model.items():
            # FD is clipped at 0, so ">= 0" would pass anything: samples and photos always differ
            assert 0.0 <= r["miou"] <= 1.0 and math.isfinite(r["fd"]) and r["fd"] > 0, (noise, model, r)
            assert r["num_images"] == 2
            samples = out / "samples" / model / noise / "samples"
            assert sorted(p.name for p in samples.glob("*.png")) == ["00000.png", "00001.png"]
    md = (out / "results.md").read_text()
    assert "| noise | mIoU SDM | mIoU SCDM | FD SDM | FD SCDM |" in md
    for row in ("| clean |", "| DS |", "| Edge |", "| Random |"):
        assert row in md
    # Every stage left a complete marker.
    markers = [json.loads(p.read_text()) for p in (out / stages.MARKER_DIR).glob("*.json")]
    assert len(markers) == 2 + 3 + 2 + 2 * 4 and all(m["complete"] for m in markers)
    # The noisy trees really are noisy: Random adds unlabeled (7) pixels; DS stores size/4 maps.
    ds = np.asarray(Image.open(out / "data" / "noisy" / "ds" / "test" / "labels" / "00000.png"))
    assert ds.shape == (4, 4)
    clean = np.asarray(Image.open(out / "data" / "toy" / "test" / "labels" / "00000.png"))
    rnd = np.asarray(Image.open(out / "data" / "noisy" / "random" / "test" / "labels" / "00000.png"))
    assert (rnd == 7).sum() > (clean == 7).sum()
    # SCDM has class-wise label diffusion, SDM none; everything else is the same.
    scdm_args = json.loads((out / "train" / "scdm" / "args.json").read_text())
    sdm_args = json.loads((out / "train" / "sdm" / "args.json").read_text())
    assert scdm_args["cond_diffuse"] and scdm_args["cond_opt"] == "discrete_zero_classwise"
    assert scdm_args["class_schedule"].endswith("class_schedule.npy")
    assert not sdm_args["cond_diffuse"] and not sdm_args["cond_opt"]
    assert scdm_args["no_instance"] and scdm_args["image_size"] == 16
    differ = ("cond_diffuse", "cond_opt", "class_schedule", "log_dir")
    assert {k: v for k, v in scdm_args.items() if k not in differ} == \
        {k: v for k, v in sdm_args.items() if k not in differ}
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 4 * 16 and grid.size[1] > 4 * 16


def test_rerun_reuses_everything_and_resamples_what_is_missing(finished):
    out, _ = finished
    before = json.loads((out / "results.json").read_text())["results"]
    missing = out / "samples" / "scdm" / "edge" / "samples" / "00001.png"
    missing.unlink()
    report = stages.run(tiny_cfg(out))
    timed = report["seconds"]["stages"]
    assert timed["toy dataset"] is None and timed["noisy maps: Edge"] is None
    assert timed["train SCDM"] is None and timed["train SDM"] is None  # reused, not retrained
    assert timed["sample SCDM on Edge"] is not None and timed["sample SDM on Edge"] is None
    assert missing.is_file()
    assert report["results"]["clean"] == before["clean"]  # deterministic samples


def test_training_continues_from_checkpoint(finished, tmp_path):
    """More --steps on an existing folder resumes from the last checkpoint instead of starting over."""
    out, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    plan = {s.name: s for s in stages.plan(copy, tiny_cfg(copy, "--steps", "3"), stages.Runner())}
    assert plan["toy dataset"].is_done() and not plan["train SCDM"].is_done()
    assert not plan["sample SCDM on clean"].is_done()  # a new model: its samples are redone
    assert plan["train SCDM"].run() is True
    assert checkpoint_steps(copy / "train" / "scdm") == [3]
    log = (copy / "train" / "scdm" / "log.txt").read_text()
    assert "resumed from" in log and "model000002.pt at step 2" in log
    assert plan["train SCDM"].is_done()


def test_refuses_foreign_folder_and_changed_settings(finished, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(QuickstartError, match="not a quickstart folder"):
        stages.run(tiny_cfg(foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "precious"
    out, _ = finished
    with pytest.raises(QuickstartError, match="--lr 0.0005 -> 0.001.*--fresh"):
        folder.prepare_out(out, tiny_cfg(out, "--lr", "0.001"), fresh=False)
    assert main(TINY + ["--out_dir", str(foreign)]) == 2
    # A folder the quickstart made while it lived in the scdm package is still its own.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / folder.STATE_FILE).write_text(json.dumps({"generator": "scdm.quickstart"}))
    folder.prepare_out(legacy, tiny_cfg(legacy), fresh=False)
    assert json.loads((legacy / folder.STATE_FILE).read_text())["generator"] == folder.GENERATOR


def test_not_enough_disk_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(folder.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    out = tmp_path / "run"
    with pytest.raises(QuickstartError, match="not enough free disk space.*MB needed, 0 MB free"):
        stages.run(tiny_cfg(out))
    assert not (out / "data").exists() and not (out / stages.MARKER_DIR).exists()


@pytest.mark.parametrize("flags,message", [
    (["--size", "18"], "error: --size must be a multiple of 4"),
    (["--random_p", "2"], "error: argument --random_p: a number in [0.0, 1.0] expected, got '2'"),
    (["--num_test", "1"], "error: argument --num_test: an integer >= 2 expected, got '1'"),
    (["--respacing", "bogus"], "error: argument --respacing: '' (every step), 'ddimN'"),
    (["--respacing", "ddim5000"], "error: --respacing ddim5000: timestep_respacing 'ddim5000': cannot take"),
    (["--batch_size", "64"], "is larger than --num_train"),
])
def test_bad_flags(flags, message, tmp_path, capsys):
    try:
        code = main(TINY + ["--out_dir", str(tmp_path / "o"), *flags])
    except SystemExit as e:  # a range is checked by argparse while it parses
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_flags_vocabulary(capsys):
    parse = config.build_parser().parse_args
    assert issubclass(QuickstartError, UserError)
    assert parse(["--quick"]).quick and parse(["--quick", "True"]).quick and not parse(["--quick", "False"]).quick
    assert parse(["--fresh"]).fresh and not parse(["--reuse"]).fresh and not parse([]).fresh
    assert config.resolve_config(parse(["--quick"]))["out_dir"] == config.BUDGETS["quick"]["out_dir"]
    cfg = config.resolve_config(parse([]))
    assert {k: cfg[k] for k in config.BUDGETS["default"]} == config.BUDGETS["default"]
    assert config.resolve_config(parse(["--out", "elsewhere"]))["out_dir"] == "elsewhere"
    assert "--out is deprecated" in capsys.readouterr().err
    assert parse(["--painter", "--sdm_unlabeled_to_zero", "yes"]).sdm_unlabeled_to_zero


def test_architecture_is_the_toy_preset_without_instance_channel():
    cfg = config.resolve_config(config.build_parser().parse_args(["--size", "16"]))
    flags = config.model_flags(cfg, "scdm", "s.npy")
    toy = PRESETS["toy"].model
    same = set(toy) - {"no_instance", "image_size", "attention_resolutions"}
    assert {k: flags[k] for k in same} == {k: toy[k] for k in same}
    assert flags["no_instance"] and flags["image_size"] == 16 and flags["class_schedule"] == "s.npy"
    sdm = config.model_flags(cfg, "sdm")
    assert sdm["cond_diffuse"] is False and "cond_opt" not in sdm and "class_schedule" not in sdm


def test_scdm_imports_neither_evaluations_nor_quickstart():
    """The library must not depend on its drivers and scorers (that made a package-level import loop)."""
    offenders = []
    for path in (REPO / "scdm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("evaluations", "quickstart")]
    assert not offenders


# ---------------------------------------------------------------------------------------------- done-marker

class Work:
    """A stage's work that writes its outputs and counts its calls (and their `resume` argument)."""

    def __init__(self, outputs, fail=False):
        self.outputs, self.fail, self.calls = outputs, fail, []

    def __call__(self, resume):
        self.calls.append(resume)
        if self.fail:
            self.outputs[0].write_text("partial")
            raise KeyboardInterrupt
        for p in self.outputs:
            p.write_text("done")


def test_stage_skips_when_key_matches_and_outputs_exist(tmp_path):
    outs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    work = Work(outs)
    stage = lambda key: stages.Stage("make a and b", key, outs, tmp_path / "markers", work)  # noqa: E731
    assert not stage({"n": 1}).is_done()
    assert stage({"n": 1}).run() is True and work.calls == [False]
    assert stage({"n": 1}).is_done()
    assert stage({"n": 1}).run() is False and work.calls == [False]          # skipped
    assert stage({"n": 2}).run() is True and work.calls == [False, False]    # key changed: rerun, nothing to resume
    outs[1].unlink()
    assert not stage({"n": 2}).is_done()
    assert stage({"n": 2}).run() is True and work.calls == [False, False, True]  # output missing: rerun, resumable
    assert stage({"n": 2}).is_done()
    assert (tmp_path / "markers" / "make_a_and_b.json").is_file()


def test_stage_interrupted_is_not_done_and_resumes_with_the_same_key(tmp_path):
    outs = [tmp_path / "a.txt"]
    with pytest.raises(KeyboardInterrupt):
        stages.Stage("s", {"k": (1, 2)}, outs, tmp_path, Work(outs, fail=True)).run()
    assert outs[0].is_file()  # a partial output is there, but the marker says incomplete
    again = stages.Stage("s", {"k": [1, 2]}, outs, tmp_path, Work(outs))
    assert not again.is_done()
    assert again.run() is True and again.work.calls == [True]  # same key (tuples read back as lists)
    other = stages.Stage("s", {"k": [3]}, outs, tmp_path, Work(outs))
    assert other.run() is True and other.work.calls == [False]


def test_stage_refuses_to_finish_without_its_outputs(tmp_path):
    stage = stages.Stage("s", {}, [tmp_path / "never.txt"], tmp_path, lambda resume: None)
    with pytest.raises(QuickstartError, match="never.txt"):
        stage.run()
    assert not stage.is_done()


# ---------------------------------------------------------------------------------------------- image_stats

def test_image_statistics_of_a_hand_made_image():
    img = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    img[0, :, :, 0] = [[0, 10], [20, 40]]
    img[0, :, :, 1] = 100
    img[0, 1, 1, 2] = 255
    f = image_stats.image_statistics(img)
    assert f.shape == (1, image_stats.NUM_STATISTICS)
    r = f[0, 0::3]  # the red channel of each group of three
    assert r[0] == pytest.approx(17.5)                      # mean
    assert r[1] == pytest.approx(math.sqrt(218.75))         # std: deviations -17.5, -7.5, 2.5, 22.5
    assert list(r[2:6]) == pytest.approx([15, 25, 40, 10])  # |horizontal|, |vertical|, |diagonal|, |anti-diagonal|
    assert list(r[6:]) == [0, 10, 20, 40]                   # 2x2 pooling of a 2x2 image: the pixels
    g = f[0, 1::3]
    assert g[0] == 100 and np.all(g[1:6] == 0)
    b = f[0, 2::3]
    assert b[0] == pytest.approx(255 / 4) and list(b[4:6]) == [255, 0]  # blue: mean; diagonal, anti-diagonal


def test_image_statistics_against_direct_computation():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 4, 6, 3), dtype=np.uint8)
    f = image_stats.image_statistics(imgs)
    x = imgs[1].astype(float)
    np.testing.assert_allclose(f[1, :3], x.mean(axis=(0, 1)))
    np.testing.assert_allclose(f[1, 3:6], x.std(axis=(0, 1)))
    np.testing.assert_allclose(f[1, 6:9], np.abs(x[:, 1:] - x[:, :-1]).mean(axis=(0, 1)))
    np.testing.assert_allclose(f[1, 18:21], x[:2, :3].mean(axis=(0, 1)))  # top-left pooled cell
    with pytest.raises(ValueError, match="RGB"):
        image_stats.image_statistics(imgs[..., 0])


def test_frechet_distance_of_gaussians_with_known_moments():
    # A 2-level factorial design: mean 0 and covariance exactly 4/3 I (unbiased), so the fits are known.
    design = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=np.float64)
    mu_a, sd_a, mu_b, sd_b = np.array([1.0, -2.0]), np.array([3.0, 0.5]), np.array([4.0, 2.0]), np.array([1.0, 2.0])
    a, b = mu_a + design * sd_a, mu_b + design * sd_b
    # Gaussians with commuting covariances: |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(4 / 3) * (sd_a - sd_b)) ** 2)
    assert image_stats.distribution_distance(a, b) == pytest.approx(expected, rel=1e-6)
    # A rotation of both sets changes neither the distance nor (being rigid) the answer.
    c, s = np.cos(0.7), np.sin(0.7)
    rot = np.array([[c, -s], [s, c]])
    assert image_stats.distribution_distance(a @ rot.T, b @ rot.T) == pytest.approx(expected, rel=1e-6)
    assert image_stats.distribution_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_against_an_independent_numpy_computation():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + 0.5

    def sqrt_psd(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = sqrt_psd(s1)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * sqrt_psd(r @ s2 @ r))
    assert image_stats.distribution_distance(a, b) == pytest.approx(expected, rel=1e-6)
    shifted = a + 10.0  # a pure mean shift: |delta mu|^2
    assert image_stats.distribution_distance(shifted, a) == pytest.approx(5 * 100, rel=1e-6)


def test_load_images(tmp_path):
    for i, v in enumerate((10, 200)):
        Image.fromarray(np.full((3, 4, 3), v, np.uint8)).save(tmp_path / f"{i:05d}.png")
    Image.fromarray(np.full((3, 4), 7, np.uint8)).save(tmp_path / "grey.png")  # converted to RGB
    imgs = image_stats.load_images(tmp_path, ["00001", "grey"])
    assert imgs.shape == (2, 3, 4, 3) and imgs[0, 0, 0, 0] == 200 and imgs[1, 0, 0, 2] == 7
    assert image_stats.load_images(tmp_path).shape == (3, 3, 4, 3)
    with pytest.raises(FileNotFoundError):
        image_stats.load_images(tmp_path / "empty")


@pytest.mark.parametrize("stop, code", [("term", 143), ("int", 130)])
def test_a_stop_exits_with_the_shell_code_of_its_signal(monkeypatch, tmp_path, capsys, stop, code):
    from scdm.runtime.errors import Terminated

    def stopped(cfg, fresh=False):
        raise Terminated() if stop == "term" else KeyboardInterrupt()

    monkeypatch.setattr(stages, "run", stopped)
    assert main(TINY + ["--out_dir", str(tmp_path / "qs")]) == code
    assert "rerun the same command to continue" in capsys.readouterr().err
