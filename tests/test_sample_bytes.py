"""Sampled files as bytes: the same for any batch size, process count or resume point
(--batch_invariant), --use_ema picks the EMA file, and bf16 runs where the CPU has it. Split from
test_train_sample.py (whose toy run it shares) so that the two run on separate pytest workers."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BIN, in_process_if_cli, require_test_extra, run_command
from test_train_sample import ENV, sample_cmd, toy, train_cmd, trained  # noqa: F401 (fixtures)


def here(args):
    """The command in this (pytest's) process: the others run in processes of their own."""
    p = in_process_if_cli(args)
    assert p is not None and p.returncode == 0, (args, p and p.stderr[-3000:])
    return p


def run(args, timeout=300):
    """A separate process: the files are compared across processes."""
    return run_command(args, ENV, timeout=timeout, in_process=False)


@pytest.fixture(scope="session")
def busy(trained, tmp_path_factory):
    """The trained run with every weight perturbed: after 2 steps the model still predicts almost zero,
    and identical files would prove nothing."""
    folder = tmp_path_factory.mktemp("busy")
    state = torch.load(trained / "ema_0.9999_000002.pt")
    gen = torch.Generator().manual_seed(0)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in state.items()}, folder / "model000002.pt")
    shutil.copy(trained / "args.json", folder / "args.json")
    return folder / "model000002.pt"

def test_sampling_gives_the_same_bytes_for_any_batch_size_process_count_and_resume(toy, busy, tmp_path):
    require_test_extra("mpi4py")
    invariant = ("--batch_invariant", "True", "--num_sets", 2)
    here(sample_cmd(toy, busy, tmp_path / "one", "--batch_size", 3, *invariant))
    mpiexec = shutil.which("mpiexec", path=str(BIN)) or "mpiexec"
    run(sample_cmd(toy, busy, tmp_path / "two", "--batch_size", 2, *invariant, launcher=[mpiexec, "-n", "2"]))
    run(sample_cmd(toy, busy, tmp_path / "resumed", "--batch_size", 1, "--num_samples", 2, *invariant))
    run(sample_cmd(toy, busy, tmp_path / "resumed", "--batch_size", 1, *invariant))
    one = tmp_path / "one"
    files = sorted(p.relative_to(one) for p in one.rglob("*.png") if p.name != "overview.png")
    assert len(files) == 5 * 6  # images, labels, labels_color, samples, samples_0, samples_1
    for rel in files:
        one = (tmp_path / "one" / rel).read_bytes()
        assert (tmp_path / "two" / rel).read_bytes() == one, rel
        assert (tmp_path / "resumed" / rel).read_bytes() == one, rel
    pixels = np.stack([np.asarray(Image.open(tmp_path / "one" / "samples" / f"{f.stem}.png")) for f in
                       (tmp_path / "one" / "samples").iterdir()])
    assert pixels.std() > 20  # real pictures from the perturbed weights
    record = json.loads((tmp_path / "one" / "fast_paths.json").read_text())
    assert record["choices"]
    assert all(" eval 1x" in k or " eval 2x" in k for k in record["choices"] if "channels_last" in k)
    assert (tmp_path / "one" / "overview.png").exists()
    # a rerun skips finished images and leaves them untouched
    before = {f: (tmp_path / "one" / f).stat().st_mtime_ns for f in files}
    out = here(sample_cmd(toy, busy, tmp_path / "one", "--batch_size", 3, "--num_sets", 2))
    assert all((tmp_path / "one" / f).stat().st_mtime_ns == before[f] for f in files), out.stderr[-500:]

def test_use_ema_samples_the_ema_file_of_the_same_step(toy, trained, tmp_path):
    common = ("--batch_size", 2, "--num_samples", 2, "--timestep_respacing", "ddim2")
    here(sample_cmd(toy, trained / "model000002.pt", tmp_path / "ema", "--use_ema", "True", *common))
    run(sample_cmd(toy, trained / "ema_0.9999_000002.pt", tmp_path / "direct", *common))
    manifest = json.loads((tmp_path / "ema" / "manifest.json").read_text())
    assert Path(manifest["checkpoint"]["path"]).name == "ema_0.9999_000002.pt"
    assert manifest["checkpoint"]["sha256"] == json.loads((tmp_path / "direct" / "manifest.json").read_text())[
        "checkpoint"]["sha256"]
    for f in (tmp_path / "direct" / "samples").iterdir():
        assert (tmp_path / "ema" / "samples" / f.name).read_bytes() == f.read_bytes()

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_sampling_and_training_run_and_say_what_ran(toy, busy, tmp_path, precision):
    """On a CPU with the native type it runs (and changes the pictures by rounding only); without it,
    one warning and fp32. Either way the manifest says what ran."""
    from scdm.fast.performance import cpu_half_support
    native = cpu_half_support(precision)[0]
    common = ("--batch_size", 2, "--num_samples", 2, "--timestep_respacing", "ddim4")
    here(sample_cmd(toy, busy, tmp_path / "fp32", "--precision", "fp32", *common))
    half = here(sample_cmd(toy, busy, tmp_path / precision, "--precision", precision, *common))
    ran = json.loads((tmp_path / precision / "manifest.json").read_text())["sampling"]["precision"]
    assert ran == (precision if native else "fp32")
    if not native:
        assert precision in half.stderr and "fp32" in half.stderr  # the one warning that it fell back
    diffs = []
    for f in (tmp_path / "fp32" / "samples").iterdir():
        a = np.asarray(Image.open(f)).astype(int)
        b = np.asarray(Image.open(tmp_path / precision / "samples" / f.name)).astype(int)
        diffs.append(np.abs(a - b).mean())
    assert max(diffs) < 12  # the same pictures up to half-precision rounding (levels of 255)
    assert (max(diffs) > 0) == native  # the half type really ran, or fp32 did
    log_dir = tmp_path / f"train-{precision}"
    out = here(train_cmd(toy, log_dir, "--max_steps", 1, "--save_interval", 1, "--precision", precision))
    assert (log_dir / "model000001.pt").exists()
    rows = (log_dir / "progress.csv").read_text().splitlines()
    assert len(rows) == 2 and "nan" not in rows[1].lower(), out.stderr[-1000:]
