"""Reliability of the dataset tools and evaluations: --overwrite never destroys data, outputs that
cannot be written fail first with one line, every numeric flag is range-checked at parse time,
and a bad file read in a data-loader worker ends in the same line as without workers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_process import downsample, edge, figure, painter, random as random_cli
from image_process.synthetic import write_tree
from scdm import class_schedule, toy
from scdm.runtime.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
ADE_LABELS = "annotations/validation"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def cli_code(main, argv):
    """Exit code of `main(argv)` run the way its `__main__` runs it (0, or 2 after one line)."""
    try:
        run_cli(main, [str(a) for a in argv])
        return 0
    except SystemExit as e:
        return e.code


def one_error_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], err
    return lines[0]


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def ade(tmp_path):
    return write_tree(tmp_path / "ADE", "ade20k", num=3, height=16, width=16)


def build(cli, data, out, *flags):
    return cli_code(cli.main, ["--data_dir", str(data), "--out_dir", str(out), "--quiet", "--num_workers", "1",
                               "--image_size", "16", *map(str, flags)])


# ----------------------------------------------------------------------------- 3: --overwrite keeps data

def test_link_to_the_source_labels_is_refused_and_the_input_untouched(ade, tmp_path, capsys):
    """The reported case: out_dir/<labels> was a link to the source labels and --overwrite rewrote
    the input annotations."""
    out = tmp_path / "out"
    (out / "annotations").mkdir(parents=True)
    link = out / ADE_LABELS
    link.symlink_to(ade / ADE_LABELS, target_is_directory=True)
    before = tree_bytes(ade)
    one_error_line(capsys, build(edge, ade, out, "--overwrite"), link, "symbolic link", "never writes through")
    assert tree_bytes(ade) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ADE", "out"]  # no staging folder left


def test_out_dir_that_resolves_into_the_data_dir_is_refused(ade, tmp_path, capsys):
    inside = tmp_path / "inside"
    inside.symlink_to(ade / "images", target_is_directory=True)
    before = tree_bytes(ade)
    one_error_line(capsys, build(random_cli, ade, inside / "noisy", "--overwrite"), "inside --data_dir",
                   "resolves to")
    one_error_line(capsys, build(random_cli, ade, ade, "--overwrite"), "inside --data_dir")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out_link").symlink_to(elsewhere, target_is_directory=True)
    one_error_line(capsys, build(random_cli, ade, tmp_path / "out_link"), "out_link is a symbolic link")
    assert tree_bytes(ade) == before and not any(elsewhere.iterdir())


def test_overwrite_removes_only_what_it_recorded(ade, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(painter, ade, out) == 0
    record = json.loads((out / "image_process_files.json").read_text())["files"]
    assert sorted(record) == sorted(tree_bytes(out))  # every file of the tree, the record included
    mine = out / ADE_LABELS / "my_notes.png"  # a user's own map-like file in a folder the builder writes
    mine.write_bytes(b"mine")
    (out / "README.txt").write_text("my notes")
    # a record edited to point outside the tree (or through a link) is not followed
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (out / "image_process_files.json").write_text(json.dumps({"files": record + ["../outside.txt"]}))
    assert build(painter, ade, out, "--num", 1, "--overwrite") == 0
    assert sorted(p.name for p in (out / ADE_LABELS).iterdir()) == ["ADE_val_00000001.png", "my_notes.png"]
    assert mine.read_bytes() == b"mine" and (out / "README.txt").read_text() == "my notes"
    assert outside.read_text() == "keep"


def test_a_bad_file_leaves_the_earlier_tree_as_it_was(ade, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(edge, ade, out) == 0
    before = tree_bytes(out)
    bad = ade / ADE_LABELS / "ADE_val_00000003.png"
    bad.write_bytes(bad.read_bytes()[:60])  # header intact, pixels cut: found while writing
    one_error_line(capsys, build(edge, ade, out, "--overwrite", "--radius", 1), bad)
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ADE", "out"]


def test_a_folder_where_a_file_goes_is_refused_before_writing(ade, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ADE_LABELS / "ADE_val_00000002.png").mkdir(parents=True)
    one_error_line(capsys, build(edge, ade, out, "--overwrite"), "ADE_val_00000002.png", "is a folder")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "annotations", ADE_LABELS, f"{ADE_LABELS}/ADE_val_00000002.png"]


# ----------------------------------------------------------------------------- 8: unwritable outputs

@pytest.fixture
def blocker(tmp_path):
    """A regular file; paths under it cannot be created."""
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


def test_image_process_out_dir_under_a_file(ade, blocker, capsys):
    one_error_line(capsys, build(downsample, ade, blocker / "out"), "--out_dir", blocker, "is a file, not a folder")
    one_error_line(capsys, build(downsample, ade, blocker), "--out_dir", "is not a folder")


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_image_process_read_only_out_dir(ade, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_error_line(capsys, build(edge, ade, ro / "out"), "--out_dir", "cannot be written")
    finally:
        ro.chmod(0o755)


def test_output_flags_are_checked_before_any_work(tmp_path, blocker, capsys):
    """Each output flag fails first, even where the inputs are missing too (so no work ran)."""
    from evaluations import report
    from evaluations.fid.__main__ import main as fid_main
    from evaluations.lpips.__main__ import main as lpips_main
    from evaluations.miou.__main__ import main as miou_main
    missing = tmp_path / "missing"
    one_error_line(capsys, cli_code(class_schedule.main, ["--dataset_mode", "folder", "--data_dir", missing,
                                                          "--out", blocker / "s.npy"]),
                   "--out", blocker, "is a file, not a folder")
    one_error_line(capsys, cli_code(class_schedule.main, ["--dataset_mode", "folder", "--data_dir", missing,
                                                          "--out", tmp_path]), "--out", "is a folder")
    one_error_line(capsys, cli_code(fid_main, ["--path", missing, missing, "--save-stats", tmp_path]),
                   "--save-stats", "is a folder")
    one_error_line(capsys, cli_code(lpips_main, ["--results", missing, "--out", blocker / "x.json"]),
                   "--out", "is a file, not a folder")
    one_error_line(capsys, cli_code(miou_main, ["--gt", missing, "--pred", missing, "--out", blocker / "m.json"]),
                   "--out", blocker)
    one_error_line(capsys, cli_code(miou_main, ["--gt", missing, "--segmenter", "toy", "--samples", missing,
                                                "--save_pred_dir", blocker / "pred"]), "--save_pred_dir", blocker)
    results = tmp_path / "results"
    results.mkdir()
    one_error_line(capsys, cli_code(report.main, ["--results", results, "--out-prefix", blocker / "r"]),
                   "--out-prefix", blocker)
    (results / "report.md").mkdir()
    one_error_line(capsys, cli_code(report.main, ["--results", results]), "--out-prefix", "report.md", "is a folder")
    one_error_line(capsys, cli_code(figure.main, ["--out", blocker / "f.png"]), "--out", blocker)


def test_one_line_from_the_module_entry_point(tmp_path, blocker):
    proc = run_module("scdm.class_schedule", "--dataset_mode", "folder", "--data_dir", tmp_path,
                      "--out", blocker / "s.npy")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --out {blocker / 's.npy'} cannot be written: {blocker} is a file, not a folder"]


# ----------------------------------------------------------------------------- 9: flags range-checked

FLAG_CASES = [
    (downsample.main, ["--data_dir", "d", "--out_dir", "o"], "--size", "0"),
    (edge.main, ["--data_dir", "d", "--out_dir", "o"], "--radius", "-1"),
    (edge.main, ["--data_dir", "d", "--out_dir", "o"], "--num_workers", "-1"),
    (edge.main, ["--data_dir", "d", "--out_dir", "o"], "--workers", "0"),
    (edge.main, ["--data_dir", "d", "--out_dir", "o"], "--num", "0"),
    (edge.main, ["--data_dir", "d", "--out_dir", "o"], "--seed", "-3"),
    (edge.main, ["--data_dir", "d", "--out_dir", "o"], "--image_size", "abc"),
    (edge.main, ["--data_dir", "d", "--out_dir", "o"], "--fill", "-1"),
    (random_cli.main, ["--data_dir", "d", "--out_dir", "o"], "--p", "1.5"),
    (random_cli.main, ["--data_dir", "d", "--out_dir", "o"], "--p", "nan"),
    (painter.main, ["--data_dir", "d", "--out_dir", "o"], "--drop_prob", "-0.1"),
    (painter.main, ["--data_dir", "d", "--out_dir", "o"], "--max_shift", "-1"),
    (painter.main, ["--data_dir", "d", "--out_dir", "o"], "--small_area", "1.5"),
    (figure.main, [], "--size", "8"),
    (figure.main, [], "--seed", "-1"),
    (figure.main, [], "--out", "fig.jpg"),
    (class_schedule.main, ["--dataset_mode", "folder", "--data_dir", "d", "--out", "o"], "--num_workers", "-1"),
    (class_schedule.main, ["--dataset_mode", "folder", "--data_dir", "d", "--out", "o"], "--num_classes", "0"),
    (class_schedule.main, ["--dataset_mode", "folder", "--data_dir", "d", "--out", "o"], "--unlabeled_id", "-2"),
    (class_schedule.main, ["--dataset_mode", "folder", "--data_dir", "d", "--out", "o"], "--max_lambda", "0.5"),
    (class_schedule.main, ["--dataset_mode", "folder", "--data_dir", "d", "--out", "o"], "--rarity_exponent", "-1"),
    (toy.main, ["--out_dir", "o"], "--num_train", "0"),
    (toy.main, ["--out_dir", "o"], "--num_test", "-1"),
    (toy.main, ["--out_dir", "o"], "--size", "4"),
    (toy.main, ["--out_dir", "o"], "--seed", "x"),
]


def _eval_cases():
    from evaluations import report
    from evaluations.fid.__main__ import main as fid_main
    from evaluations.lpips.__main__ import main as lpips_main
    from evaluations.miou.__main__ import main as miou_main
    return [
        (fid_main, ["--path", "a", "b"], "--batch-size", "0"),
        (fid_main, ["--path", "a", "b"], "--num-workers", "-1"),
        (lpips_main, ["--results", "r"], "--num_sets", "1"),
        (lpips_main, ["--results", "r"], "-b", "0"),
        (lpips_main, ["--results", "r"], "--num_workers", "-2"),
        (miou_main, ["--gt", "g"], "--num_classes", "0"),
        (miou_main, ["--gt", "g"], "--ignore_index", "-5"),
        (report.main, ["--results", "r"], "--num_sets", "0"),
        (report.main, ["--results", "r"], "--batch_size", "-1"),
        (report.main, ["--results", "r"], "--num_workers", "-1"),
        (report.main, ["--results", "r"], "--num_classes", "abc"),
        (report.main, ["--results", "r"], "--ignore_index", "-1"),
    ]


@pytest.mark.parametrize("case", range(len(FLAG_CASES) + 12))
def test_numeric_flags_are_range_checked_at_parse_time(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, even by mistake
    main, base, flag, value = (FLAG_CASES + _eval_cases())[case]
    code = cli_code(main, [*base, flag, value])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: argument " in line]
    assert len(lines) == 1 and flag in lines[0].split(": error: argument ")[1].split(":")[0], err
    assert f"expected, got '{value}'" in lines[0], err
    assert not any(tmp_path.iterdir())


def test_range_helpers_accept_the_edges():
    from scdm.runtime.cli import float_in, int_at_least, nonnegative_float, positive_float, positive_int, probability
    import argparse
    assert probability("0") == 0.0 and probability("1") == 1.0 and positive_int("1") == 1
    assert int_at_least(-1)("-1") == -1 and nonnegative_float("0") == 0.0
    for fn, bad in ((positive_float, "0"), (float_in(0, 1, hi_open=True), "1"), (float_in(0, 1, lo_open=True), "0"),
                    (positive_int, "1.0"), (probability, "inf")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            fn(bad)


# ----------------------------------------------------------------------------- 10: messages

def test_missing_data_dir_says_so_instead_of_asking_for_num_classes(tmp_path):
    from scdm.data.dataset_layouts import DatasetNotFoundError, dataset_info
    with pytest.raises(DatasetNotFoundError, match=r"--data_dir .*missing.* is not a folder"):
        dataset_info("folder", str(tmp_path / "missing"))


def test_too_few_classes_names_the_file_and_the_id(tmp_path):
    from scdm.data.dataset_layouts import DatasetError
    from scdm.data.datasets import build_dataset
    root = toy.make_toy_dataset(str(tmp_path / "toy"), num_train=2, num_test=1, size=16, seed=0)
    with pytest.raises(DatasetError, match=r"unlabeled_id=7 is outside 0..2: the unlabeled id comes from "
                                           r".*dataset.json, num_classes=3 from --num_classes"):
        build_dataset("folder", root, 16, True, num_classes=3)
    os.unlink(os.path.join(root, "dataset.json"))
    ds = build_dataset("folder", root, 16, True, num_classes=3)
    first = ds.records[0].label
    present = np.unique(np.asarray(Image.open(first)))
    assert present.max() >= 3  # the toy maps hold ids up to 7
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert f"label map {first} contains id {present[present >= 3].min()};" in str(e.value)
    assert "expected class ids 0..2" in str(e.value)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # the header stays, the pixels are cut


def test_worker_error_is_the_same_line_as_without_workers_fid(tmp_path):
    """FID's loader with a worker process: the user error comes back as itself, word for word."""
    import torch
    from evaluations.common import EvalError
    from evaluations.fid import compute_fid
    for d in ("samples", "gt"):
        (tmp_path / d).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + len(d), np.uint8)).save(tmp_path / d / f"{i}.png")
    _truncate(tmp_path / "samples" / "1.png")

    def feature_fn(x):
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)

    messages = []
    for workers in (0, 1):
        with pytest.raises(EvalError) as e:
            compute_fid(tmp_path / "samples", tmp_path / "gt", feature_fn=feature_fn, device="cpu",
                        num_workers=workers, batch_size=2)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and str(tmp_path / "samples" / "1.png") in messages[0]
    assert "\n" not in messages[1] and "DataLoader" not in messages[1] and "Traceback" not in messages[1]


def test_worker_error_is_one_line_from_class_schedule(tmp_path):
    root = Path(toy.make_toy_dataset(str(tmp_path / "toy"), num_train=3, num_test=1, size=16, seed=0))
    bad = root / "train" / "labels" / "00001.png"
    _truncate(bad)
    proc = run_module("scdm.class_schedule", "--dataset_mode", "folder", "--data_dir", root,
                      "--out", tmp_path / "s.npy", "--num_workers", 1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr
    assert not (tmp_path / "s.npy").exists()
