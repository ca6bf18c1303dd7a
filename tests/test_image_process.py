"""image_process CLIs on fake dataset trees: full tree, determinism, refusals, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_process import downsample, edge, painter, random as random_cli
from image_process.synthetic import colorize, write_tree
from scdm.data import corruptions as C, dataset_layouts, datasets

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"downsample": downsample, "edge": edge, "random": random_cli, "painter": painter}
ADE = ("images/validation", "annotations/validation")


def run(cli, data, out, *flags, workers=1):
    """The CLI's exit code: 0, or 2 after one `error:` line (run_cli exits)."""
    try:
        return CLIS[cli].main(["--data_dir", str(data), "--out_dir", str(out), "--quiet",
                               "--num_workers", str(workers), *map(str, flags)])
    except SystemExit as e:
        return e.code


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ids(path):
    return np.asarray(Image.open(path))


@pytest.fixture
def ade(tmp_path):
    return write_tree(tmp_path / "ADEChallengeData2016", "ade20k", num=5, height=24, width=32)


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_writes_complete_ade20k_tree(cli, ade, tmp_path):
    out = tmp_path / "out"
    size_flag = ["--size", 8] if cli == "downsample" else []
    assert run(cli, ade, out, "--num", 4, "--image_size", 16, *size_flag) == 0
    names = sorted(p.stem for p in (ade / ADE[0]).iterdir())[:4]
    assert sorted(p.stem for p in (out / ADE[0]).iterdir()) == names
    assert sorted(p.stem for p in (out / ADE[1]).iterdir()) == names
    assert (out / "corruption.json").is_file() and not list(out.rglob(".*"))
    side = 8 if cli == "downsample" else 16
    for name in names:
        assert os.path.samefile(out / ADE[0] / f"{name}.jpg", ade / ADE[0] / f"{name}.jpg")
        src, noisy = ids(ade / ADE[1] / f"{name}.png"), ids(out / ADE[1] / f"{name}.png")
        assert noisy.shape == (side, side) and noisy.dtype == np.uint8
        assert set(np.unique(noisy)) <= set(np.unique(src)) | {0}
        rng = C.derive_rng(0, name)
        expected = {"downsample": lambda: C.downsample(src, 8),
                    "edge": lambda: C.edge_noise(C.resize_nearest(src, 16), radius=2),
                    "random": lambda: C.random_noise(C.resize_nearest(src, 16), 0.1, rng=rng),
                    "painter": lambda: C.painter_noise(C.resize_nearest(src, 16), rng=rng)}[cli]()
        np.testing.assert_array_equal(noisy, expected)


@pytest.mark.parametrize("cli", ["random", "painter"])
def test_same_seed_same_bytes_for_any_worker_count(cli, ade, tmp_path):
    assert run(cli, ade, tmp_path / "a", "--seed", 3, workers=1) == 0
    assert run(cli, ade, tmp_path / "b", "--seed", 3, workers=2) == 0
    assert run(cli, ade, tmp_path / "c", "--seed", 4, workers=2) == 0
    a, b, c = (tree_bytes(tmp_path / k) for k in "abc")
    assert a == b
    assert {k: v for k, v in a.items() if "annotations" in k} != {k: v for k, v in c.items() if "annotations" in k}


def test_refuses_non_empty_out_dir_without_overwrite(ade, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert run("edge", ade, out) == 2
    assert "--out_dir" in capsys.readouterr().err and not (out / "images").exists()
    assert run("edge", ade, out, "--num", 5, "--overwrite") == 0
    assert run("edge", ade, out, "--num", 2, "--overwrite") == 0  # a smaller rerun leaves no stale maps
    assert len(list((out / ADE[1]).iterdir())) == 2 and (out / "keep.txt").exists()


def test_coco_edges_come_from_instance_maps(tmp_path):
    data = write_tree(tmp_path / "coco", "coco", num=3, height=20, width=20)
    out = tmp_path / "out"
    assert run("edge", data, out, "--dataset_mode", "coco", "--image_size", 20, "--radius", 1) == 0
    for path in sorted((data / "val_label").iterdir()):
        label, inst = ids(path), ids(data / "val_inst" / path.name)
        blank = C.boundary_mask(inst, 1)
        np.testing.assert_array_equal(ids(out / "val_label" / path.name), np.where(blank, 255, label))
        np.testing.assert_array_equal(ids(out / "val_inst" / path.name), np.where(blank, 255, inst))
        assert (out / "val_img" / f"{path.stem}.jpg").is_file()


def test_palette_label_maps_keep_their_palette(ade, tmp_path):
    palette = [v for i in range(256) for v in (i, 255 - i, 7)]
    for path in (ade / ADE[1]).iterdir():
        img = Image.fromarray(ids(path)).convert("P")
        img.putpalette(palette)
        img.save(path)
    assert run("random", ade, tmp_path / "out", "--image_size", 16) == 0
    for path in (tmp_path / "out" / ADE[1]).iterdir():
        with Image.open(path) as img:
            assert img.mode == "P" and img.getpalette() == palette


def test_cityscapes_painter_keeps_16_bit_instance_maps(tmp_path):
    data = write_tree(tmp_path / "cityscapes", "cityscapes", num=2, height=16, width=32)
    out = tmp_path / "out"
    assert run("painter", data, out, "--dataset_mode", "cityscapes", "--image_size", 16, "--max_shift", 2) == 0
    labels = sorted(out.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    insts = sorted(out.glob("gtFine/val/*/*_gtFine_instanceIds.png"))
    assert len(labels) == len(insts) == 2 and len(list(out.glob("leftImg8bit/val/*/*_leftImg8bit.png"))) == 2
    for path in insts:
        inst = ids(path)
        assert inst.dtype == np.uint16 and inst.shape == (16, 16) and inst.max() > 1000


# ----------------------------------------------------------------------------- bad input

def expect_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert str(needle) in err, err


def test_colour_label_map(ade, tmp_path, capsys):
    bad = ade / ADE[1] / "ADE_val_00000002.png"
    gray = ids(bad)
    Image.fromarray(colorize(gray)).save(bad)
    expect_error(capsys, run("edge", ade, tmp_path / "out"), bad, "mode RGB")
    assert not (tmp_path / "out").exists()
    Image.fromarray(gray).convert("RGB").save(bad)  # gray stored as RGB is ids, as in the loader
    assert run("edge", ade, tmp_path / "out") == 0
    assert ids(tmp_path / "out" / ADE[1] / bad.name).dtype == np.uint8


def test_missing_annotations_folder(ade, tmp_path, capsys):
    (ade / ADE[1]).rename(ade / "annotations" / "val")
    expect_error(capsys, run("random", ade, tmp_path / "out"), ade / ADE[1], "--data_dir")


def test_map_size_differs_from_image(ade, tmp_path, capsys):
    bad = ade / ADE[1] / "ADE_val_00000003.png"
    Image.fromarray(ids(bad)[:, :20]).save(bad)
    expect_error(capsys, run("downsample", ade, tmp_path / "out"), bad, "20x24", "32x24")


def test_out_dir_inside_data_dir(ade, capsys):
    expect_error(capsys, run("painter", ade, ade / "noisy"), "--out_dir", "inside --data_dir")


def test_bad_flag_values(ade, tmp_path, capsys):
    def parse_error(code, flag, expected):
        err = capsys.readouterr().err
        assert code == 2 and f"error: argument {flag}" in err and expected in err and "Traceback" not in err, err

    parse_error(run("random", ade, tmp_path / "o", "--p", 2), "--p", "[0.0, 1.0] expected, got '2'")
    parse_error(run("edge", ade, tmp_path / "o", "--radius", -1), "--radius", ">= 0 expected, got '-1'")
    parse_error(run("painter", ade, tmp_path / "o", "--drop_prob", "abc"), "--drop_prob", "a number expected")
    parse_error(run("downsample", ade, tmp_path / "o", "--size", 0), "--size", ">= 1 expected")
    parse_error(run("edge", ade, tmp_path / "o", workers=0), "--num_workers", ">= 1 expected, got '0'")
    expect_error(capsys, run("edge", ade, tmp_path / "o", "--fill", 300), "--fill 300")
    assert not (tmp_path / "o").exists()


def test_unreadable_map_stops_cleanly_without_partial_files(ade, tmp_path, capsys):
    bad = ade / ADE[1] / "ADE_val_00000004.png"
    bad.write_bytes(bad.read_bytes()[:60])  # header intact, pixel data cut
    out = tmp_path / "out"
    expect_error(capsys, run("edge", ade, out, workers=2), bad)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ADEChallengeData2016"]


def test_sigterm_to_the_main_process_ends_the_pool_and_leaves_nothing(ade, tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM to the main process alone: the pool workers end with it (they would
    otherwise wait on their task queue forever) and no half-built tree stays."""
    import multiprocessing
    import signal
    import threading
    import time

    from image_process import common

    started = tmp_path / "started"
    slow = common.process

    def slow_process(job, item):  # the workers are forked: they run this patched function
        started.touch()
        time.sleep(0.5)
        return slow(job, item)

    monkeypatch.setattr(common, "process", slow_process)

    def stop_when_a_worker_runs():
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "out"
    earlier = set(multiprocessing.active_children())  # another test's processes in this pytest worker
    threading.Thread(target=stop_when_a_worker_runs, daemon=True).start()
    code = run("edge", ade, out, workers=2)
    assert code == 143, capsys.readouterr().err
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ADEChallengeData2016", "started"]
    deadline = time.monotonic() + 30  # a terminated worker is reaped a moment later on a busy machine
    while set(multiprocessing.active_children()) - earlier and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(multiprocessing.active_children()) - earlier
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # run_cli put the handler back


def test_a_worker_that_dies_ends_the_run_with_one_line(ade, tmp_path, capsys, monkeypatch):
    """A worker killed mid-task (the out-of-memory killer at a huge --image_size) used to leave the main
    process waiting forever for its results: now one error line, exit 2, and no half-built tree."""
    import signal

    from image_process import common

    plain = common.process

    def dying_process(job, item):  # the workers are forked: they run this patched function
        if item.key.endswith("2"):
            os.kill(os.getpid(), signal.SIGKILL)
        return plain(job, item)

    monkeypatch.setattr(common, "process", dying_process)
    out = tmp_path / "out"
    code = run("edge", ade, out, workers=2)
    err = capsys.readouterr().err
    assert code == 2 and "error: a worker process died while making the tree" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ADEChallengeData2016"]


def test_a_stop_signal_while_an_overwrite_moves_files_in_leaves_one_whole_tree(ade, tmp_path, capsys, monkeypatch):
    """SIGTERM (as a scheduler sends it; Ctrl-C is held back the same way, but a pytest worker ignores
    SIGINT) waits until the new tree is in place: never the earlier run's files mixed with the new
    ones under the new corruption.json."""
    import signal

    from image_process import common

    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run("edge", ade, out, "--seed", 1) == 0
    assert run("edge", ade, fresh, "--seed", 2) == 0
    plain, moved = common.move_file, []

    def interrupted_move(src, dst):
        if not moved:
            os.kill(os.getpid(), signal.SIGTERM)  # as the first file moves in
        moved.append(dst)
        return plain(src, dst)

    monkeypatch.setattr(common, "move_file", interrupted_move)
    code = run("edge", ade, out, "--seed", 2, "--overwrite")
    assert code == 143, capsys.readouterr().err
    assert len(moved) > 1 and tree_bytes(out) == tree_bytes(fresh)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "image_process.edge", "--data_dir", str(tmp_path / "none"),
                           "--out_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--data_dir" in proc.stderr


# ----------------------------------------------------------------------------- loader

@pytest.mark.parametrize("layout", ["ade20k", "coco", "celeba", "cityscapes", "folder"])
def test_scdm_loader_reads_the_tree(layout, tmp_path):
    """Every layout of the dataset table goes through image_process and back into the loader."""
    data = write_tree(tmp_path / layout, layout, num=3, height=32, width=32)
    out = tmp_path / "out"
    fill = ["--fill", 0] if layout == "celeba" else []  # celeba has no unlabeled id: background here
    assert run("painter", data, out, "--image_size", 32, "--dataset_mode", layout, *fill) == 0
    ds = datasets.build_dataset(layout, str(out), image_size=32, is_train=False)
    assert len(ds) == 3
    written = {"ade20k": "annotations/validation/ADE_val_00000001.png", "coco": "val_label/000000000001.png",
               "celeba": "test/labels/0.png", "folder": "test/labels/00000.png",
               "cityscapes": "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"}[layout]
    _, cond = ds[0]
    np.testing.assert_array_equal(cond["label_ori"][0].numpy(), ids(out / written))
    assert ("instance" in cond) == (layout != "ade20k")


def test_celeba_tree_needs_fill_and_uses_label_boundaries(tmp_path, capsys):
    data = write_tree(tmp_path / "celeba", "celeba", num=3, height=16, width=16)
    out = tmp_path / "out"
    code = run("edge", data, out, "--dataset_mode", "celeba", "--image_size", 16)
    expect_error(capsys, code, "--dataset_mode celeba has no unlabeled id", "--fill ID")
    assert not out.exists()
    assert run("edge", data, out, "--dataset_mode", "celeba", "--image_size", 16, "--fill", 0, "--radius", 1) == 0
    expected = sorted(["corruption.json", "image_process_files.json"]
                      + [f"test/{sub}/{i}.{ext}" for i in range(3)
                         for sub, ext in (("images", "jpg"), ("labels", "png"))])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == expected
    assert json.loads((out / "image_process_files.json").read_text())["files"] == expected  # the record of the run
    for i in range(3):
        label = ids(data / "test" / "labels" / f"{i}.png")  # the label map doubles as instance map
        np.testing.assert_array_equal(ids(out / "test" / "labels" / f"{i}.png"),
                                      np.where(C.boundary_mask(label, 1), 0, label))


def test_webp_images_are_seen_like_the_loader_sees_them(tmp_path):
    data = write_tree(tmp_path / "data", "folder", num=3, height=16, width=16)
    for p in sorted((data / "test" / "images").iterdir()):
        Image.open(p).save(p.with_suffix(".webp"), lossless=True)
        p.unlink()
    assert len(datasets.build_dataset("folder", str(data), 16, is_train=False)) == 3
    out = tmp_path / "out"
    assert run("random", data, out, "--dataset_mode", "folder", "--image_size", 16) == 0
    assert sorted(p.name for p in (out / "test" / "images").iterdir()) == ["00000.webp", "00001.webp", "00002.webp"]
    assert len(datasets.build_dataset("folder", str(out), 16, is_train=False)) == 3


def test_workers_alias_and_boolean_flags(ade, tmp_path, capsys):
    out = tmp_path / "out"
    assert edge.main(["--data_dir", str(ade), "--out_dir", str(out), "--workers", "2", "--quiet", "True",
                      "--image_size", "24"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers is deprecated" in err and "--num_workers" in err
    assert run("edge", ade, out, "--num", 2) == 2 and "--overwrite" in capsys.readouterr().err
    assert run("edge", ade, out, "--num", 2, "--overwrite", "True") == 0
    assert run("edge", ade, out, "--num", 2, "--overwrite", "False") == 2
    assert len(list((out / ADE[1]).iterdir())) == 2


def test_output_files_honour_the_umask(toy_folder, tmp_path):
    import stat
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert run("edge", toy_folder, out, "--dataset_mode", "folder", "--image_size", 16) == 0
    finally:
        os.umask(old)
    written = [p for p in out.rglob("*") if p.is_file() and "images" not in p.parts]
    assert {p.name for p in written} >= {"corruption.json", "dataset.json", "00000.png"}
    for path in written:  # maps and JSON are new files; images are hard links and keep their source's mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:  # the tree's root too, not mkdtemp's 0700
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


def test_scdm_loader_reads_downsampled_maps(tmp_path):
    """DS stores 64x64 (here 8x8) maps beside full-size images; with label_resize the test transform
    brings them to SxS with one nearest resize."""
    data = write_tree(tmp_path / "ade", "ade20k", num=2, height=32, width=32)
    assert run("downsample", data, tmp_path / "out", "--size", 8) == 0
    with pytest.raises(ValueError, match="--label_resize True"):
        datasets.build_dataset("ade20k", str(tmp_path / "out"), image_size=32, is_train=False)[0]
    ds = datasets.build_dataset("ade20k", str(tmp_path / "out"), image_size=32, is_train=False, label_resize=True)
    _, cond = ds[0]
    stored = np.asarray(Image.open(sorted((tmp_path / "out").rglob("*.png"))[0]))
    assert stored.shape == (8, 8)
    expected = np.asarray(Image.fromarray(stored).resize((32, 32), Image.NEAREST))
    np.testing.assert_array_equal(cond["label_ori"][0].numpy(), expected)


def test_scdm_loader_keeps_image_size_maps_exact(tmp_path):
    """Edge maps are written at --image_size beside larger images: loading them at that size is exact."""
    data = write_tree(tmp_path / "ade", "ade20k", num=2, height=48, width=64)
    assert run("edge", data, tmp_path / "out", "--image_size", 32) == 0
    ds = datasets.build_dataset("ade20k", str(tmp_path / "out"), image_size=32, is_train=False, label_resize=True)
    _, cond = ds[0]
    stored = np.asarray(Image.open(sorted((tmp_path / "out").rglob("*.png"))[0]))
    assert stored.shape == (32, 32)
    np.testing.assert_array_equal(cond["label_ori"][0].numpy(), stored)


# ----------------------------------------------------------------------------- folder layout

@pytest.fixture
def toy_folder(tmp_path):
    from scdm.toy import make_toy_dataset
    return Path(make_toy_dataset(str(tmp_path / "toy"), num_train=2, num_test=4, size=16, seed=1))


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_folder_layout_tree_reads_back(cli, toy_folder, tmp_path):
    """--dataset_mode folder: split test, fill = dataset.json's unlabeled id (toy: 7), instances
    treated with the labels, dataset.json copied so that the loader reads the tree as it is."""
    from scdm.toy import TOY_UNLABELED_ID
    out = tmp_path / "out"
    size_flag = ["--size", 4] if cli == "downsample" else []
    assert run(cli, toy_folder, out, "--dataset_mode", "folder", "--num", 3, "--image_size", 16, *size_flag) == 0
    names = ["00000", "00001", "00002"]
    for sub in ("images", "labels", "instances"):
        assert sorted(p.stem for p in (out / "test" / sub).iterdir()) == names
    assert not (out / "train").exists() and not list(out.rglob(".*"))
    assert (out / "dataset.json").read_bytes() == (toy_folder / "dataset.json").read_bytes()
    manifest = __import__("json").loads((out / "corruption.json").read_text())
    assert manifest["fill"] == TOY_UNLABELED_ID and manifest["split"] == "test"
    side = 4 if cli == "downsample" else 16
    for name in names:
        src = ids(toy_folder / "test" / "labels" / f"{name}.png")
        inst = ids(toy_folder / "test" / "instances" / f"{name}.png")
        noisy = ids(out / "test" / "labels" / f"{name}.png")
        assert noisy.shape == (side, side) and noisy.dtype == np.uint8
        expected, expected_inst = C.corrupt(
            cli, src, inst, fill=TOY_UNLABELED_ID, rng=C.derive_rng(0, name),
            **({"size": 4} if cli == "downsample" else {}))
        np.testing.assert_array_equal(noisy, expected)
        np.testing.assert_array_equal(ids(out / "test" / "instances" / f"{name}.png"), expected_inst)
    if cli != "downsample":
        assert any((ids(out / "test" / "labels" / f"{n}.png") == TOY_UNLABELED_ID).sum()
                   > (ids(toy_folder / "test" / "labels" / f"{n}.png") == TOY_UNLABELED_ID).sum() for n in names)
    info = dataset_layouts.dataset_info("folder", str(out))
    assert (info.num_classes, info.unlabeled_id) == (8, TOY_UNLABELED_ID)
    ds = datasets.build_dataset("folder", str(out), image_size=16, is_train=False, label_resize=True)
    assert len(ds) == 3
    _, cond = ds[0]
    stored = ids(out / "test" / "labels" / "00000.png")
    np.testing.assert_array_equal(cond["label_ori"][0].numpy(),
                                  np.asarray(Image.fromarray(stored).resize((16, 16), Image.NEAREST)))
    assert "instance" in cond


def test_folder_layout_fill_from_flag_or_clear_error(toy_folder, tmp_path, capsys):
    (toy_folder / "dataset.json").unlink()
    expect_error(capsys, run("random", toy_folder, tmp_path / "a", "--dataset_mode", "folder"),
                 "dataset.json", "--fill")
    assert run("random", toy_folder, tmp_path / "b", "--dataset_mode", "folder", "--image_size", 16,
               "--fill", 9, "--p", 0.5) == 0
    assert 9 in np.unique(ids(tmp_path / "b" / "test" / "labels" / "00000.png"))
    assert not (tmp_path / "b" / "dataset.json").exists()
    (toy_folder / "test" / "labels").rename(toy_folder / "test" / "labelz")
    expect_error(capsys, run("edge", toy_folder, tmp_path / "c", "--dataset_mode", "folder", "--fill", 7),
                 toy_folder / "test" / "labels", "folder layout")


@pytest.mark.parametrize("cli, flags, hint", [
    ("downsample", [], "pass --size 4"),
    ("edge", [], "pass --image_size 16"),
    ("painter", [], "pass --image_size 16"),
])
def test_no_op_noise_is_reported(cli, flags, hint, toy_folder, tmp_path, capsys):
    """Defaults made for 256 px ADE20K change nothing on 16 px maps: say so, and what to pass; the
    manifest records the share of label pixels changed at the stored size."""
    assert run(cli, toy_folder, tmp_path / "noop", "--dataset_mode", "folder", *flags) == 0
    err = capsys.readouterr().err
    manifest = json.loads((tmp_path / "noop" / "corruption.json").read_text())
    assert manifest["changed_fraction"] < 0.001 and "(almost) a no-op" in err and hint in err
    good = {"downsample": ["--size", 4], "edge": ["--image_size", 16, "--radius", 1],
            "painter": ["--image_size", 16, "--max_shift", 2, "--small_area", 4]}[cli]
    assert run(cli, toy_folder, tmp_path / "ok", "--dataset_mode", "folder", *good) == 0
    assert "no-op" not in capsys.readouterr().err
    manifest = json.loads((tmp_path / "ok" / "corruption.json").read_text())
    changed = [(np.asarray(Image.open(p)) != np.asarray(Image.open(toy_folder / "test" / "labels" / p.name)))
               for p in sorted((tmp_path / "ok" / "test" / "labels").glob("*.png"))] if cli != "downsample" else None
    if changed is not None:  # stored at the clean size: the fraction is the plain share of differing pixels
        assert manifest["changed_fraction"] == pytest.approx(np.mean(changed), abs=1e-6)
    assert manifest["changed_fraction"] > 0.001


# ----------------------------------------------------------------------------- describe
@pytest.fixture(scope="module")
def toy64(tmp_path_factory):
    from scdm.toy import make_toy_dataset
    return Path(make_toy_dataset(tmp_path_factory.mktemp("toy64") / "toy", 1, 10, 64, 0))


@pytest.mark.parametrize("cli,noise,flags", [("edge", "edge", []), ("random", "random", []),
                                             ("downsample", "ds", ["--size", 16])])
def test_describe_registers_a_tree_made_elsewhere(toy64, tmp_path, cli, noise, flags):
    """A noisy tree without corruption.json (as the released noisy sets come) gets one: the noise
    (guessed), the changed share as image_process measures it, and the clean source."""
    from image_process import describe
    out = tmp_path / cli
    assert run(cli, toy64, out, "--dataset_mode", "folder", *flags) == 0
    made = json.loads((out / "corruption.json").read_text())
    (out / "corruption.json").unlink()
    assert describe.main(["--data_dir", str(out), "--clean_dir", str(toy64), "--dataset_mode", "folder"]) == 0
    got = json.loads((out / "corruption.json").read_text())
    assert got["noise"] == noise and got["changed_fraction"] == made["changed_fraction"] > 0
    assert got["data_dir"] == str(toy64.resolve()) and got["split"] == "test" and got["num"] == 10
    from scdm.results_folder import read_corruption
    assert read_corruption(out)["noise"] == noise  # the sampler reads it as one of ours


def test_describe_refuses_what_it_cannot_pair(toy64, tmp_path, capsys):
    import shutil

    from image_process import describe
    from scdm.runtime.errors import run_cli
    out = tmp_path / "edge"
    assert run("edge", toy64, out, "--dataset_mode", "folder") == 0
    for argv, needle in (([], "already exists"), (["--clean_dir", str(tmp_path / "none"), "--overwrite", "True"],
                                                  "--clean_dir"),
                         (["--clean_dir", str(out), "--overwrite", "True"], "the same folder")):
        base = ["--data_dir", str(out), "--clean_dir", str(toy64), "--dataset_mode", "folder"]
        with pytest.raises(SystemExit) as e:
            run_cli(describe.main, base + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, err
    other = Path(shutil.copytree(toy64, tmp_path / "other"))
    (other / "test" / "images" / "00000.png").rename(other / "test" / "images" / "99999.png")
    (other / "test" / "labels" / "00000.png").rename(other / "test" / "labels" / "99999.png")
    (other / "test" / "instances" / "00000.png").rename(other / "test" / "instances" / "99999.png")
    (out / "corruption.json").unlink()
    with pytest.raises(SystemExit):
        run_cli(describe.main, ["--data_dir", str(out), "--clean_dir", str(other), "--dataset_mode", "folder"])
    assert "no clean map of the same name" in capsys.readouterr().err
    assert not (out / "corruption.json").exists()


def test_figure_draws_each_noise_beside_the_clean_map(tmp_path, capsys):
    from image_process import figure
    out = tmp_path / "fig" / "corruptions.png"
    (tmp_path / "fig").mkdir()
    assert figure.main(["--out", str(out), "--size", "64", "--seed", "3"]) == 0
    assert str(out) in capsys.readouterr().out
    image = np.asarray(Image.open(out).convert("RGB"))
    items = figure.panels(64, 3)
    gap, caption = 8, 22
    assert image.shape == (64 + caption + 2 * gap, len(items) * (64 + gap) + gap, 3)
    for i, (_, label) in enumerate(items):
        x = gap + i * (64 + gap)
        drawn = image[gap:gap + 64, x:x + 64]
        assert (drawn == colorize(label)).all(axis=-1).mean() > 0.99, i  # palette PNG: a colour may merge
    assert not (items[0][1] == items[2][1]).all() and not (items[0][1] == items[3][1]).all()  # noises change maps
