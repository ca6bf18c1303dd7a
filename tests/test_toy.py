"""scdm.toy: determinism, the exact segmenter, instances, and loading through the folder layout."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from scdm import toy
from scdm.runtime.errors import UserError, run_cli
from scdm.data.dataset_layouts import dataset_info
from scdm.data.datasets import build_dataset


def tree_bytes(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    toy.make_toy_dataset(a, num_train=5, num_test=2, size=32, seed=7)
    toy.make_toy_dataset(b, num_train=5, num_test=2, size=32, seed=7)
    toy.make_toy_dataset(c, num_train=5, num_test=2, size=32, seed=8)
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert len(ta) == 3 * 7 + 1 and ta == tb
    assert ta["train/images/00000.png"] != tc["train/images/00000.png"]
    # an item does not depend on how many others were generated
    toy.make_toy_dataset(a, num_train=2, num_test=0, size=32, seed=7)  # replaces the previous toy data
    assert tree_bytes(a)["train/labels/00001.png"] == tb["train/labels/00001.png"]
    assert not os.path.exists(os.path.join(a, "train/images/00004.png"))


@pytest.mark.parametrize("size", [32, 64])
def test_segmenter_recovers_every_pixel(size):
    for i in range(12):
        image, label, _ = toy.make_toy_sample(size, seed=1, split="train", index=i)
        assert image.dtype == np.uint8 and label.dtype == np.int64
        np.testing.assert_array_equal(toy.segment_toy_image(image), label)


def test_segmenter_on_saved_files_and_with_noise(tmp_path):
    toy.make_toy_dataset(str(tmp_path), num_train=3, num_test=3, size=48, seed=2)
    for split in ("train", "test"):
        for i in range(3):
            image = np.asarray(Image.open(tmp_path / split / "images" / f"{i:05d}.png"))
            label = np.asarray(Image.open(tmp_path / split / "labels" / f"{i:05d}.png"))
            np.testing.assert_array_equal(toy.segment_toy_image(image), label)
            noisy = np.clip(image + np.random.default_rng(i).integers(-40, 41, image.shape), 0, 255)
            assert (toy.segment_toy_image(noisy.astype(np.uint8)) == label).mean() > 0.99
    with pytest.raises(ValueError, match="H, W, 3"):
        toy.segment_toy_image(np.zeros((4, 4)))


def test_instances_are_per_class_components():
    image, label, instance = toy.make_toy_sample(64, seed=0, split="train", index=3)
    ids = np.unique(instance)
    assert ids.min() >= 1
    for i in ids:  # one class per instance, and each instance is one connected blob
        assert len(np.unique(label[instance == i])) == 1
        assert ndimage.label(instance == i)[1] == 1
    for c in np.unique(label):  # separate blobs of a class get separate ids
        assert len(np.unique(instance[label == c])) == ndimage.label(label == c)[1]


def test_class_mix_has_unlabeled_small_and_rare_classes():
    present = np.zeros(toy.TOY_NUM_CLASSES)
    area = np.zeros(toy.TOY_NUM_CLASSES)
    n = 60
    for i in range(n):
        label = toy.make_toy_sample(32, seed=0, split="train", index=i)[1]
        counts = np.bincount(label.ravel(), minlength=toy.TOY_NUM_CLASSES)
        present += counts > 0
        area += counts / label.size
    share = present / n
    assert (share > 0).all()  # every class occurs, the unlabeled one included
    assert share[6] < 0.4 and share[toy.TOY_UNLABELED_ID] < 0.8  # gem is rare
    assert area[5] / present[5] < 0.06 and area[6] / present[6] < 0.06  # flower and gem are small
    assert toy.TOY_CLASSES[toy.TOY_UNLABELED_ID].name == "unlabeled"


def test_toy_tree_loads_without_flags(tmp_path):
    toy.make_toy_dataset(str(tmp_path), num_train=3, num_test=2, size=32, seed=0)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["num_classes"] == toy.TOY_NUM_CLASSES and meta["unlabeled_id"] == toy.TOY_UNLABELED_ID
    info = dataset_info("folder", str(tmp_path))
    assert (info.num_classes, info.unlabeled_id, info.has_instance) == (8, 7, True)
    ds = build_dataset("folder", str(tmp_path), image_size=32, is_train=False)
    image, cond = ds[1]
    saved = np.asarray(Image.open(tmp_path / "test" / "instances" / "00001.png"))
    np.testing.assert_array_equal(cond["instance"][0].numpy(), saved)


def test_cli_and_refusing_foreign_folders(tmp_path, capsys):
    out = tmp_path / "toy"
    toy.main(["--out_dir", str(out), "--num_train", "2", "--num_test", "1", "--size", "16", "--seed", "3"])
    assert "--dataset_mode folder --data_dir" in capsys.readouterr().out
    assert len(os.listdir(out / "train" / "images")) == 2
    toy.main(["--out", str(out), "--num_train", "1", "--num_test", "1", "--size", "16"])  # the old spelling
    assert "--out is deprecated" in capsys.readouterr().err
    assert len(os.listdir(out / "train" / "images")) == 1
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a toy dataset"):
        toy.make_toy_dataset(str(foreign), num_train=1, num_test=0, size=16)
    with pytest.raises(SystemExit) as e:
        run_cli(toy.main, ["--out_dir", str(foreign), "--num_train", "1"])
    assert e.value.code == 2 and "error: --out_dir" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_rerun_keeps_what_the_generator_did_not_write(tmp_path):
    """Replacing an earlier toy dataset must not take a user's own files in its split folders with it."""
    out = tmp_path / "toy"
    toy.make_toy_dataset(str(out), num_train=2, num_test=1, size=16)
    (out / "train" / "images" / "notes.txt").write_text("mine")
    (out / "test" / "extra").mkdir()
    with pytest.raises(UserError, match=r"also holds train/images/notes.txt, test/extra, which .* never writes"):
        toy.make_toy_dataset(str(out), num_train=1, num_test=1, size=16)
    assert (out / "train" / "images" / "notes.txt").read_text() == "mine"
    assert len(os.listdir(out / "train" / "images")) == 3  # the two images, untouched
    (out / "train" / "images" / "notes.txt").unlink()
    (out / "test" / "extra").rmdir()
    toy.make_toy_dataset(str(out), num_train=1, num_test=1, size=16)
    assert os.listdir(out / "train" / "images") == ["00000.png"]
