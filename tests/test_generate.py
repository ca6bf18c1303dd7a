"""scdm.generate: a folder of label maps with no photos -> samples, coloured maps, side-by-side pictures."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scdm.pipeline import SCDMPipeline
from tiny_run import make_tiny_run

from conftest import run_in_process

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def generate(*args, process=False):
    """`python -m scdm.generate args`: in this process unless `process` (a real interpreter, once, so that the
    command itself is run as users run it)."""
    if not process:
        return run_in_process("scdm.generate", args, cwd=ROOT)
    return subprocess.run([sys.executable, "-m", "scdm.generate", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=240)


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    model = make_tiny_run(base)
    maps = base / "maps"
    maps.mkdir()
    a = np.zeros((16, 16), np.uint8)
    a[4:12, 4:12] = 1
    a[:, 13:] = 3
    Image.fromarray(a).save(maps / "square.png")
    Image.fromarray(np.kron(a[:8, :8], np.ones((3, 3), np.uint8))).save(maps / "big.png")  # 24x24
    (maps / "notes.txt").write_text("not a map")
    return base, model, maps, a


def test_folder_without_photos(setup):
    base, model, maps, a = setup
    out = base / "out"
    p = generate("--model_path", model, "--labels", maps, "--out", out, "--num_samples", 2, "--steps", 2, "--seed", 5,
                 process=True)
    assert p.returncode == 0, p.stderr
    assert "big.png is 24x24; resized to the model's 16x16" in p.stderr
    assert "note: precision " in p.stderr and "(--precision auto: " in p.stderr  # what ran, and why
    files = digests(out)
    assert sorted(files) == ["labels_color/big.png", "labels_color/square.png", "samples/big_0.png",
                             "samples/big_1.png", "samples/square_0.png", "samples/square_1.png",
                             "side_by_side/big.png", "side_by_side/square.png"]
    pipe = SCDMPipeline.from_checkpoint(model)
    want = pipe(a.astype(np.int64), num_samples=2, steps=2, seed=5, names=["square"])
    for k in range(2):
        assert (np.asarray(Image.open(out / "samples" / f"square_{k}.png")) == np.asarray(want[k])).all()
    assert (np.asarray(Image.open(out / "labels_color" / "square.png")) == np.asarray(pipe.colorize(a))).all()
    with Image.open(out / "side_by_side" / "square.png") as im:
        assert im.size[0] > 3 * 128 and im.size[1] > 128
    # the same seed gives the same files, alone or beside other maps; another seed other samples
    again = base / "again"
    assert generate("--model_path", model, "--labels", maps / "square.png", "--out", again, "--num_samples", 2,
                    "--steps", 2, "--seed", 5).returncode == 0
    assert all(digests(again)[k] == files[k] for k in digests(again))
    other = base / "other"
    assert generate("--model_path", model, "--labels", maps / "square.png", "--out", other, "--steps", 2,
                    "--seed", 6).returncode == 0
    assert digests(other)["samples/square_0.png"] != files["samples/square_0.png"]


@pytest.mark.parametrize("args, message", [
    (["--labels", "{base}/nowhere"], "--labels {base}/nowhere does not exist"),
    (["--labels", "{base}/empty"], "no label maps"),
    (["--labels", "{base}/maps", "--steps", "0"], "argument --steps"),
    (["--labels", "{base}/maps", "--sampler", "bogus"], "argument --sampler"),
    (["--labels", "{base}/bad"], "ids [7] outside 0..3"),
])
def test_user_errors(setup, args, message):
    base, model, maps, a = setup
    (base / "empty").mkdir(exist_ok=True)
    (base / "bad").mkdir(exist_ok=True)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(base / "bad" / "seven.png")
    p = generate("--model_path", model, "--out", base / "err", *[s.format(base=base) for s in args])
    assert p.returncode == 2
    assert message.format(base=base) in p.stderr and "Traceback" not in p.stderr


def test_a_preset_that_contradicts_the_run_config_is_one_warning_naming_what_wins(setup):
    base, model, maps, a = setup
    p = generate("--model_path", model, "--labels", maps / "square.png", "--out", base / "preset", "--steps", 2,
                 "--preset", "ade20k")
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("warning: preset 'ade20k' not used for")]
    assert len(lines) == 1 and "num_classes" in lines[0] and f"the run config {model.parent / 'args.json'}" in lines[0]
    assert "UserWarning" not in p.stderr and "warnings.warn" not in p.stderr


def test_pipeline_given_a_path_gives_generates_images(setup):
    """One behaviour across entry points: the same map file, seed and sample index give the same image
    from the pipeline (which keys its seeds on the file name, as generate does) and from generate, and
    both treat unlabeled pixels alike by default ([MASK] for this SCDM model)."""
    base, model, maps, a = setup
    out = base / "same"
    p = generate("--model_path", model, "--labels", maps / "square.png", "--out", out, "--num_samples", 2,
                 "--steps", 2, "--seed", 3)
    assert p.returncode == 0, p.stderr
    assert ("unlabeled pixels (id 3) reach the model as the [MASK] state (--unlabeled_to_zero True, the default"
            in p.stderr)
    pipe = SCDMPipeline.from_checkpoint(model)
    images = pipe(str(maps / "square.png"), num_samples=2, steps=2, seed=3)
    for k in range(2):
        assert (np.asarray(Image.open(out / "samples" / f"square_{k}.png")) == np.asarray(images[k])).all()
    by_position = pipe(a.astype(np.int64), num_samples=1, steps=2, seed=3)  # an array has no name: keyed "0"
    assert not (np.asarray(by_position[0]) == np.asarray(images[0])).all()
    assert (np.asarray(pipe(a.astype(np.int64), num_samples=1, steps=2, seed=3, unlabeled_to_zero=True)[0])
            == np.asarray(pipe(a.astype(np.int64), num_samples=1, steps=2, seed=3)[0])).all()
