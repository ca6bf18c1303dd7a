"""scdm.class_schedule against a hand computation on a tiny dataset, plus the CLI."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from scdm import class_schedule as cs
from scdm.data.dataset_layouts import DatasetError
from scdm.runtime.errors import run_cli


def write_tree(root, labels, num_classes=4, unlabeled_id=3):
    for i, lab in enumerate(labels):
        for sub, arr in (("images", np.zeros(lab.shape + (3,), np.uint8)), ("labels", lab.astype(np.uint8))):
            os.makedirs(root / "train" / sub, exist_ok=True)
            Image.fromarray(arr).save(root / "train" / sub / f"{i}.png")
    (root / "dataset.json").write_text(json.dumps({"num_classes": num_classes, "unlabeled_id": unlabeled_id}))


def tiny_labels():
    a = np.zeros((4, 4), np.int64)
    a[3] = 1                      # class 0: 12/16, class 1: 4/16
    b = np.zeros((4, 4), np.int64)  # class 0: 16/16
    c = np.zeros((4, 4), np.int64)
    c[:2] = 3                     # class 0: 8/16, class 3 (unlabeled): 8/16
    return [a, b, c]              # class 2 never occurs


def test_schedule_matches_hand_computation(tmp_path):
    write_tree(tmp_path, tiny_labels())
    lam = cs.compute_class_schedule("folder", str(tmp_path))
    # class 0: in 3/3 images, mean area (0.75 + 1 + 0.5) / 3 = 0.75 -> 1 / (0.75 * 1) = 4/3
    # class 1: in 1/3 images, area 0.25 -> 1 / (0.25 * sqrt(1/3)) = 4 sqrt(3)
    # class 2: absent -> 0.5; class 3: unlabeled -> 0.5
    expect = np.array([4 / 3, 4 * np.sqrt(3), 0.5, 0.5])
    assert lam.dtype == np.float64 and lam.shape == (4,)
    np.testing.assert_allclose(lam, expect, rtol=1e-12)
    stats, info = cs.collect_class_stats("folder", str(tmp_path))
    np.testing.assert_array_equal(stats.images_with, [3, 1, 0, 1])
    np.testing.assert_allclose(stats.mean_area, [0.75, 0.25, 0.0, 0.5])
    # without an unlabeled class, class 3 follows the recipe: 1 / (0.5 * sqrt(1/3))
    lam = cs.compute_class_schedule("folder", str(tmp_path), num_classes=5, unlabeled_id=None)
    assert lam.shape == (5,)


def test_clipping_bounds(tmp_path):
    full = np.zeros((4, 4), np.int64)  # class 0 everywhere, always: lambda 1 -> floor 1.001
    tiny = np.zeros((100, 100), np.int64)
    tiny[0, 0] = 1                      # one pixel in one of 2 images: 1e4 * sqrt(2) -> cap 1e4
    write_tree(tmp_path / "a", [full, full], num_classes=2, unlabeled_id=None)
    np.testing.assert_allclose(cs.compute_class_schedule("folder", str(tmp_path / "a")), [cs.MIN_LAMBDA, 0.5])
    write_tree(tmp_path / "b", [tiny, np.zeros((100, 100), np.int64)], num_classes=2, unlabeled_id=None)
    lam = cs.compute_class_schedule("folder", str(tmp_path / "b"))
    assert lam[1] == cs.MAX_LAMBDA and 1 < lam[0] < 1.01


def test_ade20k_layout_remaps_before_counting(tmp_path):
    for i, raw in enumerate([np.array([[0, 1], [1, 2]]), np.array([[1, 1], [1, 1]])]):
        for sub, ext, arr in (("images", "jpg", np.zeros((2, 2, 3), np.uint8)), ("annotations", "png", raw)):
            os.makedirs(tmp_path / sub / "training", exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(tmp_path / sub / "training" / f"x{i}.{ext}")
    lam = cs.compute_class_schedule("ade20k", str(tmp_path))
    assert lam.shape == (151,)
    np.testing.assert_allclose(lam[0], 1 / ((0.5 + 1) / 2))             # raw 1 -> class 0
    np.testing.assert_allclose(lam[1], 1 / (0.25 * np.sqrt(0.5)))        # raw 2 -> class 1
    assert lam[150] == 0.5 and (lam[2:150] == 0.5).all()                  # unlabeled and absent


def test_cli_writes_npy_and_prints_table(tmp_path, capsys):
    write_tree(tmp_path, tiny_labels())
    out = tmp_path / "sub" / "schedule.npy"
    cs.main(["--dataset_mode", "folder", "--data_dir", str(tmp_path), "--out", str(out)])
    np.testing.assert_allclose(np.load(out), [4 / 3, 4 * np.sqrt(3), 0.5, 0.5])
    assert os.listdir(out.parent) == ["schedule.npy"]  # no temp file left behind
    text = capsys.readouterr().out
    assert "(unlabeled)" in text and "(absent)" in text and "lambda percentiles" in text
    with pytest.raises(SystemExit) as e:
        run_cli(cs.main, ["--dataset_mode", "folder", "--data_dir", str(tmp_path / "nope"), "--out", str(out)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --data_dir")


def test_table_is_short_for_many_classes():
    stats = cs.ClassStats(10, np.arange(151) % 10, np.full(151, 0.01))
    lam = cs.lambdas_from_stats(stats, unlabeled_id=150)
    text = cs.format_table(stats, lam, 150)
    assert len(text.splitlines()) < 30 and "..." in text


def test_bad_label_is_reported(tmp_path):
    labels = tiny_labels()
    labels[1][0, 0] = 7
    write_tree(tmp_path, labels)
    with pytest.raises(DatasetError, match=r"1.png contains id 7"):
        cs.compute_class_schedule("folder", str(tmp_path))
