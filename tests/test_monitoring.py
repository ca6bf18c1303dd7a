"""Training you can watch: sample grids at --sample_interval and at saves, TensorBoard event files read
back, the progress plot, and the pieces of the grid (noisy maps, [MASK] holes in y, toy mIoU)."""
import csv
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scdm.data.conditioning import Conditioning
from scdm.data.palettes import MASK_COLOR, colorize, palette
from scdm.toy import TOY_NUM_CLASSES, TOY_UNLABELED_ID
from scdm.training.train_monitor import TrainMonitor, scalar_tag
from scdm.training.train_samples import (HOLE, NOISES, TILE, GridLayout, model_input_with_holes, noisy_versions,
                                pooled_miou)

from conftest import ROOT, TOY_ARCH, run_command, toy_train_argv, write_toy

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
       "HOME": str(Path(tempfile.gettempdir()) / "scdm-test-home")}  # caches (matplotlib, wandb) stay out of the repo
MAPS = 2


def run(args, check=True, timeout=300):
    return run_command([sys.executable, *args], ENV, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), num_train=8, num_test=4)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """3 steps with --sample_interval 2: grids at step 2 (interval) and 3 (the final save)."""
    log_dir = tmp_path_factory.mktemp("run")
    p = run(toy_train_argv(toy, log_dir, "--max_steps", 3, "--save_interval", 100, "--sample_interval", 2,
                           "--sample_maps", MAPS, "--sample_respacing", "ddim2"))
    return log_dir, p.stderr


def progress_rows(log_dir):
    with open(log_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_grids_at_the_interval_and_the_final_save(trained, toy):
    log_dir, stderr = trained
    assert sorted(p.name for p in (log_dir / "samples").iterdir()) == ["step_000002.png", "step_000003.png"]
    grid = np.asarray(Image.open(log_dir / "samples" / "step_000003.png").convert("RGB"))
    layout = GridLayout(rows=MAPS, weights=["EMA 0.9999", "raw"], tile=TILE)
    assert layout.columns == 1 + len(NOISES) * 3
    assert grid.shape[1] == layout.size[0]
    assert grid.shape[0] > layout.size[1]  # the class legend below
    colors = palette("toy", TOY_NUM_CLASSES, TOY_UNLABELED_ID)
    scale = TILE // 32
    for row in range(MAPS):  # the test split's maps, in name order, each clean label tile exactly its map
        ids = np.asarray(Image.open(toy / "test" / "labels" / f"{row:05d}.png")).astype(np.int64)
        want = colorize(ids, colors).repeat(scale, 0).repeat(scale, 1)
        for group, noise in enumerate(NOISES):
            x, y = layout.box(row, layout.column(group, 0))
            tile = grid[y:y + TILE, x:x + TILE]
            holes = (tile == MASK_COLOR).all(-1)
            if noise == "clean":
                assert (tile == want).all()
            if noise in ("Edge", "Random"):  # blanked pixels are [MASK] grey, the rest is the clean map
                assert holes.any() and (tile[~holes] == want[~holes]).all()
            else:
                assert not holes.any()
    assert "3/3" in stderr and "img/s=" in stderr  # the bar counts to --max_steps and shows throughput
    log = (log_dir / "log.txt").read_text()
    assert "samples: step_000002.png" in log and "miou_ema_clean=" in log


def test_event_file_holds_the_scalars_and_the_grids(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log_dir, _ = trained
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/loss", "loss/mse", "loss/vb", "train/lr", "train/grad_norm", "train/images_per_s",
                "train/rss_peak_gb", "samples/miou_ema_clean", "samples/miou_raw_random", "samples/sample_seconds"):
        assert tag in tags["scalars"], tag
    assert any(t.startswith("loss_by_timestep_quartile/mse_q") for t in tags["scalars"])
    rows = progress_rows(log_dir)
    events = {e.step: e.value for e in acc.Scalars("loss/mse")}
    assert sorted(events) == [1, 2, 3]
    for row in rows:  # the same numbers as progress.csv
        assert events[int(row["step"])] == pytest.approx(float(row["mse"]), rel=1e-6)
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 3]
    grid = Image.open(log_dir / "samples" / "step_000003.png")
    decoded = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert decoded.size == grid.size
    assert (np.asarray(decoded.convert("RGB")) == np.asarray(grid.convert("RGB"))).all()


def test_plot_progress_writes_a_png(trained, tmp_path):
    log_dir, _ = trained
    out = tmp_path / "curves.png"
    p = run(["-m", "scdm.plot_progress", log_dir, "--out", out, "--smoothing", 0.5])
    assert f"wrote {out}" in p.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 300
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # curves drawn, not a blank page
    p = run(["-m", "scdm.plot_progress", tmp_path / "missing"], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: LOG_DIR")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "progress.csv").write_text("step,loss\n")
    p = run(["-m", "scdm.plot_progress", tmp_path / "empty"], check=False)
    assert p.returncode == 2 and "no logged steps" in p.stderr
    p = run(["-m", "scdm.plot_progress", log_dir, "--smoothing", 1], check=False)
    assert p.returncode == 2 and "--smoothing" in p.stderr


def test_a_respacing_the_diffusion_cannot_take_stops_before_training(toy, tmp_path):
    p = run(["-m", "scdm.image_train", *TOY_ARCH, "--data_dir", toy, "--log_dir", tmp_path / "run", "--dry_run",
             "--sample_interval", 5, "--sample_respacing", "ddim999"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: --sample_respacing ddim999")
    p = run(["-m", "scdm.image_train", *TOY_ARCH, "--data_dir", toy, "--log_dir", tmp_path / "run", "--dry_run",
             "--sample_interval", -1], check=False)
    assert p.returncode == 2 and "--sample_interval" in p.stderr


def test_without_tensorboard_one_line_and_no_writer(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    lines = []
    monitor = TrainMonitor(tmp_path, wandb_project="proj", note=lines.append)
    assert not monitor.enabled and len(lines) == 2
    assert "tensorboard is not installed" in lines[0] and "--wandb proj" in lines[1]
    monitor.scalars(1, {"loss": 1.0})
    monitor.close()
    assert list(tmp_path.iterdir()) == []


def test_scalar_tags_group_the_curves():
    assert scalar_tag("mse_q3") == "loss_by_timestep_quartile/mse_q3"
    assert scalar_tag("vb") == "loss/vb"
    assert scalar_tag("miou_ema_ds") == "samples/miou_ema_ds"
    assert scalar_tag("grad_norm") == "train/grad_norm"


def toy_map():
    ids = np.zeros((32, 32), dtype=np.int64)
    ids[:, 16:] = 1
    ids[20:, :10] = 2
    inst = ids * 10 + (np.arange(32)[None, :] >= 24)  # a second instance of class 1
    return ids, inst


def test_noisy_versions_are_the_papers_noises_at_this_size():
    ids, inst = toy_map()
    out = noisy_versions(ids, inst, seed=[0, 1])
    assert (out["clean"][0] == ids).all()
    small = Image.fromarray(ids.astype(np.uint8)).resize((8, 8), Image.NEAREST)  # 32 / 4, then back
    assert (out["DS"][0] == np.asarray(small.resize((32, 32), Image.NEAREST))).all()
    edge = np.zeros(ids.shape, bool)  # radius 0 at 32 px: both sides of every instance boundary
    dx, dy = inst[:, 1:] != inst[:, :-1], inst[1:] != inst[:-1]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:] |= dy
    edge[:-1] |= dy
    assert ((out["Edge"][0] == HOLE) == edge).all() and ((out["Edge"][1] == HOLE) == edge).all()
    holes = out["Random"][0] == HOLE
    assert 0.05 < holes.mean() < 0.15 and (out["Random"][0][~holes] == ids[~holes]).all()
    assert (noisy_versions(ids, inst, seed=[0, 1])["Random"][0] == out["Random"][0]).all()
    assert not (noisy_versions(ids, inst, seed=[0, 2])["Random"][0] == out["Random"][0]).all()


def test_holes_are_all_zero_in_y():
    ids, inst = toy_map()
    noisy, ninst = noisy_versions(ids, inst, seed=[0, 1])["Random"]
    cond = Conditioning(num_classes=3, no_instance=False)
    y = model_input_with_holes(cond, noisy[None], ninst[None])
    holes = torch.from_numpy(noisy == HOLE)
    assert y.shape == (1, 4, 32, 32)
    assert (y[0, :3, holes] == 0).all()
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(ids), 3).permute(2, 0, 1).float()
    assert torch.equal(y[0, :3, ~holes], one_hot[:, ~holes])
    assert y[0, 3].sum() > 0  # the edge channel is there


def test_pooled_miou_against_a_hand_count():
    gt = [np.array([[0, 0], [1, 1]]), np.array([[2, 2], [1, 1]])]
    pred = [np.array([[0, 1], [1, 1]]), np.array([[2, 2], [1, 0]])]
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 3, FP 1, FN 1 -> 3/5; class 2: 2/2
    assert pooled_miou(pred, gt, 3) == pytest.approx((1 / 3 + 3 / 5 + 1) / 3)
    # ignoring class 2: its pixels are not scored and it is not averaged
    assert pooled_miou(pred, gt, 3, ignore=2) == pytest.approx((1 / 3 + 3 / 5) / 2)


def test_validation_maps_fall_back_to_the_first_training_maps(tmp_path):
    from scdm.data.dataset_layouts import dataset_info
    from scdm.toy import make_toy_dataset
    from scdm.training.train_samples import load_validation_maps
    root = make_toy_dataset(str(tmp_path / "toy"), num_train=3, num_test=0, size=16)
    info = dataset_info("folder", root)
    cond = Conditioning(info.num_classes, no_instance=False, unlabeled_id=info.unlabeled_id)
    maps = load_validation_maps("folder", root, 16, info, cond, count=2)
    assert maps.split == "train" and maps.names == ["00000", "00001"]
    for k in range(2):  # centre crop of a same-size image: the stored map itself, never flipped
        stored = np.asarray(Image.open(Path(root) / "train" / "labels" / f"{k:05d}.png")).astype(np.int64)
        assert (maps.ids["clean"][k] == stored).all()
    assert maps.photos.shape == (2, 16, 16, 3) and set(maps.y) == set(NOISES)
    assert maps.y["clean"].shape == (2, info.num_classes + 1, 16, 16)


def test_wandb_offline_run_on_disk(tmp_path, monkeypatch):
    """Only where wandb is installed (it is no test dependency): WANDB_MODE=offline keeps the run in
    LOG_DIR/wandb, with the grid as a media file."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = TrainMonitor(tmp_path, tensorboard=False, wandb_project="scdm-test", config={"lr": 1e-4},
                           note=pytest.fail)
    monitor.scalars(1, {"loss": 1.0, "mse_q0": 0.5})
    monitor.image(2, "samples", Image.new("RGB", (40, 30), "red"))
    monitor.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = list(runs[0].glob("files/media/images/samples_*.png"))
    assert len(media) == 1 and Image.open(media[0]).size == (40, 30)


def test_smoothing_is_tensorboards_debiased_average():
    from scdm.plot_progress import effective_smoothing, smooth
    x = np.array([1.0, 3.0, np.nan, 2.0])
    w = 0.5
    done = x[np.isfinite(x)]
    want = [sum(w ** (n - 1 - i) * (1 - w) * done[i] for i in range(n)) / (1 - w ** n) for n in (1, 2, 3)]
    got = smooth(x, w)
    assert np.isnan(got[2]) and got[[0, 1, 3]] == pytest.approx(want)
    assert (smooth(x, 0.0)[[0, 1, 3]] == done).all()
    assert effective_smoothing(0.9, 20) == pytest.approx(0.5) and effective_smoothing(0.9, 1000) == 0.9
