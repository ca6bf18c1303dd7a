"""Sampling runs you can trust: the model flags come from the run config beside the checkpoint,
every results folder records what made it (manifest.json), reruns with other settings are refused,
noisy trees need no extra flag, and a failed start leaves nothing behind."""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (TINY_FLAGS, TOY_ARCH, auto_precision_here, in_ci, in_process_if_cli, random_label_map,
                      run_command, toy_train_argv, write_toy)
from scdm import figures, image_sample, results_folder, run_config
from scdm.data.palettes import palette, palette_name, spread_colors
from scdm.diffusion.sampling import sample_loop
from scdm.script_util import create_model_and_diffusion
from scdm.toy import TOY_COLORS, TOY_UNLABELED_ID

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
FAST = ["--timestep_respacing", "ddim2", "--batch_size", "3"]


def run(args, timeout=240, check=True):
    return run_command(args, ENV, check=check, timeout=timeout)


def sample(model, data, results, *extra, check=True):
    args = ["--model_path", model, "--data_dir", data, "--results_path", results, *FAST, *extra]
    return run([sys.executable, "-m", "scdm.image_sample", *args], check=check)


def snapshot(folder):
    """Every file under `folder` with its bytes' hash and mtime."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), num_train=6, num_test=4)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    run([sys.executable, *toy_train_argv(toy, log_dir, "--max_steps", 2, "--save_interval", 2)])
    assert (log_dir / "args.json").is_file()
    return log_dir


@pytest.fixture(scope="module")
def sampled(toy, trained, tmp_path_factory):
    """One results folder made with --model_path alone (no architecture flag)."""
    res = tmp_path_factory.mktemp("res") / "out"
    p = sample(trained / "model000002.pt", toy, res)
    return res, p


def test_model_path_is_enough(toy, trained, sampled):
    res, p = sampled
    names = sorted(f.stem for f in (toy / "test" / "images").iterdir())
    for d in ("images", "labels", "labels_color", "samples"):
        assert sorted(f.stem for f in (res / d).glob("*.png")) == names, d
    assert f"wrote {len(names)} samples" in p.stdout
    m = json.loads((res / "manifest.json").read_text())
    model = trained / "model000002.pt"
    assert m["checkpoint"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert m["checkpoint"]["size"] == model.stat().st_size and m["checkpoint"]["step"] == 2
    assert m["model_flags_from"] == f"run config {trained / 'args.json'}"
    assert m["model"]["num_classes"] == 8 and m["model"]["num_channels"] == 32 and m["model"]["unlabeled_id"] == 7
    assert m["sampling"]["timestep_respacing"] == "ddim2" and m["sampling"]["s"] == 1.0 and m["seed"] == 0
    # the default --precision auto: bf16 where this CPU has it natively, else fp32; the manifest and log say so
    assert m["sampling"]["precision"] == auto_precision_here()
    assert m["sampling"]["precision_requested"] == "auto"
    assert f"note: precision {m['sampling']['precision']} (--precision auto: this CPU " in p.stderr
    assert m["labels"] == {"data_dir": str(toy.resolve()), "dataset_mode": "folder", "is_train": False,
                           "corruption": None, "unlabeled": "as the unlabeled class 7"}
    assert m["code"]["scdm"] and "git_commit" in m["code"]
    # no EMA warning for the raw model
    assert "warning" not in p.stderr


def test_labels_color_uses_the_toy_palette_and_black_for_unlabeled(toy, sampled):
    res, _ = sampled
    for f in sorted((res / "labels").glob("*.png")):
        ids = np.asarray(Image.open(f)).astype(int)  # folder layout: raw ids are the class ids
        rgb = np.asarray(Image.open(res / "labels_color" / f.name))
        expected = TOY_COLORS[ids].copy()
        expected[ids == TOY_UNLABELED_ID] = 0
        assert np.array_equal(rgb, expected), f.name


def test_overview_has_headers_and_large_tiles(sampled):
    res, _ = sampled
    im = np.asarray(Image.open(res / "overview.png").convert("RGB"))
    tile, gap, head, rows = figures.OVERVIEW_TILE, 4, 24, 4
    grid = head + rows * (tile + gap) - gap
    assert im.shape[1] == 3 * tile + 2 * gap and im.shape[0] > grid
    legend = im[grid:]  # below the tiles: the legend, toy class colours as swatches and dark names
    shown = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
    assert (legend < 128).any() and shown & {tuple(c) for c in TOY_COLORS[:5].tolist()}
    band = im[:head]
    assert (band < 128).any() and (band == 255).mean() > 0.7  # dark header text on white
    # the label column is the labels_color map scaled with nearest: its colours only
    first = sorted((res / "labels_color").glob("*.png"))[0]
    colors = {tuple(c) for c in np.asarray(Image.open(first)).reshape(-1, 3)}
    label_tile = im[head:head + tile, :tile].reshape(-1, 3)
    assert {tuple(c) for c in label_tile} <= colors


def test_rerun_with_other_settings_is_refused_then_overwritten(toy, trained, tmp_path):
    model = trained / "model000002.pt"
    res = tmp_path / "res"
    sample(model, toy, res)
    (res / "notes.txt").write_text("mine")
    (res / "report.json").write_text("{}")
    before = snapshot(res)
    p = sample(model, toy, res, "--s", 3.0, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "s: 1.0 -> 3.0" in p.stderr and "--overwrite" in p.stderr
    assert snapshot(res) == before
    # the same settings resume: nothing is rewritten
    p = sample(model, toy, res, "--batch_size", 2)  # batch size is not compared
    assert "0 samples" in p.stdout
    assert {k: v for k, v in snapshot(res).items() if k.endswith(".png") and k != "overview.png"} == \
        {k: v for k, v in before.items() if k.endswith(".png") and k != "overview.png"}
    # another model: the differing sha256 is named first
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained / "args.json", other)
    shutil.copy(trained / "ema_0.9999_000002.pt", other / "model000002.pt")
    p = sample(other / "model000002.pt", toy, res, "--s", 3.0, check=False)
    assert p.returncode == 2 and "model sha256: " in p.stderr.split("settings (")[1].split(",")[0]
    # (after two training steps the label branch is still ~0, so a new seed is what makes new pixels)
    p = sample(model, toy, res, "--s", 3.0, "--seed", 1, "--overwrite")
    after = snapshot(res)
    m = json.loads((res / "manifest.json").read_text())
    assert m["sampling"]["s"] == 3.0 and m["sampling"]["seed"] == 1
    samples = [k for k in before if k.startswith("samples/")]
    assert samples and all(after[k][0] != before[k][0] for k in samples)
    assert (res / "notes.txt").read_text() == "mine" and (res / "report.json").is_file()
    assert "kept notes.txt, report.json" in p.stderr


def test_folder_without_manifest_is_refused_unless_overwrite(toy, trained, tmp_path):
    res = tmp_path / "old"
    (res / "samples").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(res / "samples" / "00000.png")
    p = sample(trained / "model000002.pt", toy, res, check=False)
    assert p.returncode == 2 and "without a manifest.json" in p.stderr and "--overwrite" in p.stderr
    assert sorted(str(f.relative_to(res)) for f in res.rglob("*")) == ["samples", "samples/00000.png"]
    sample(trained / "model000002.pt", toy, res, "--overwrite", "--num_samples", 1)
    assert (res / "manifest.json").is_file() and sorted(f.name for f in (res / "samples").iterdir()) == ["00000.png"]


def test_a_folder_holding_what_the_sampler_never_writes_is_refused_even_with_overwrite(toy, trained, tmp_path):
    """A dataset root (images/training/...) or a user's notes in samples/ are not the sampler's to delete:
    the run stops before anything changes, naming them."""
    res = tmp_path / "ade"
    (res / "images" / "training").mkdir(parents=True)
    (res / "images" / "training" / "ADE_0001.jpg").write_bytes(b"photo")
    (res / "samples").mkdir()
    (res / "samples" / "notes.txt").write_text("mine")
    before = snapshot(res)
    for extra in ([], ["--overwrite"]):
        p = sample(trained / "model000002.pt", toy, res, *extra, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "images/training, samples/notes.txt, which image_sample never writes" in p.stderr, p.stderr
        assert snapshot(res) == before and sorted(os.listdir(res)) == ["images", "samples"]


def test_a_results_path_inside_the_label_maps_is_refused(toy, trained):
    before = snapshot(toy)
    for inside in (toy, toy / "test", toy / "test" / "out"):
        p = sample(trained / "model000002.pt", toy, inside, check=False)
        assert p.returncode == 2 and f"overlaps --data_dir {toy}" in p.stderr, p.stderr
    assert snapshot(toy) == before


def test_an_earlier_run_that_wrote_no_sample_does_not_block_other_settings(toy, trained, sampled, tmp_path):
    """A run that failed on its first map leaves its manifest and empty folders; a corrected rerun with
    other settings starts over (with a note) instead of being refused for samples that do not exist."""
    res = tmp_path / "failed"
    for d in results_folder.OUTPUT_DIRS:
        (res / d).mkdir(parents=True)
    shutil.copy(sampled[0] / "manifest.json", res)
    p = sample(trained / "model000002.pt", toy, res, "--s", 3.0, "--num_samples", 1)
    assert "wrote no sample; starting over" in p.stderr and "s: 1.0 -> 3.0" in p.stderr
    assert json.loads((res / "manifest.json").read_text())["sampling"]["s"] == 3.0
    assert len(list((res / "samples").glob("*.png"))) == 1


def test_sampling_without_label_maps_is_refused_up_front_and_too_many_samples_is_said(toy, trained, tmp_path):
    p = run([sys.executable, "-m", "scdm.image_sample", "--model_path", trained / "model000002.pt",
             "--results_path", tmp_path / "res"], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --data_dir is required")
    assert not (tmp_path / "res").exists()
    p = sample(trained / "model000002.pt", toy, tmp_path / "res", "--num_samples", 100)
    assert "--num_samples 100: --data_dir" in p.stderr and "has 4 label map(s); sampling all 4" in p.stderr
    assert len(list((tmp_path / "res" / "samples").glob("*.png"))) == 4


def test_architecture_flags_that_contradict_the_run_are_refused(toy, trained, tmp_path):
    model = trained / "model000002.pt"
    p = sample(model, toy, tmp_path / "r", "--num_classes", 12, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "does not fit the flags: checkpoint has 9 label channels, flags give num_classes=12" in p.stderr
    assert f"the run config {trained / 'args.json'} has num_classes=8" in p.stderr
    p = sample(model, toy, tmp_path / "r", "--learn_sigma", "False", check=False)
    assert p.returncode == 2 and "learn_sigma=False" in p.stderr
    p = sample(model, toy, tmp_path / "r", "--noise_schedule", "cosine", check=False)
    assert p.returncode == 2 and "--noise_schedule cosine contradicts the run" in p.stderr
    assert "noise_schedule=linear" in p.stderr
    assert not (tmp_path / "r").exists()
    # the same values as the run are fine, and so is -1 ("from the dataset")
    sample(model, toy, tmp_path / "ok", "--num_classes", 8, "--num_channels", 32, "--unlabeled_id", -1,
           "--num_samples", 1)


def test_released_checkpoint_needs_preset_or_flags(toy, trained, tmp_path):
    released = tmp_path / "released"
    released.mkdir()
    shutil.copy(trained / "model000002.pt", released)
    model = released / "model000002.pt"
    p = sample(model, toy, tmp_path / "r", "--dataset_mode", "folder", check=False)
    assert p.returncode == 2 and "--preset ade20k|coco|celeba|cityscapes|toy" in p.stderr
    assert "no args.json" in p.stderr and not (tmp_path / "r").exists()
    # the released way: every architecture flag
    sample(model, toy, tmp_path / "flags", *TOY_ARCH, "--num_samples", 1)
    m = json.loads((tmp_path / "flags" / "manifest.json").read_text())
    assert m["model_flags_from"] == "command line" and m["model"]["num_channels"] == 32
    # a preset (explicit flags still win over it)
    sample(model, toy, tmp_path / "preset", "--preset", "toy", "--cond_opt", "discrete_zero_uniform",
           "--num_samples", 1)
    m = json.loads((tmp_path / "preset" / "manifest.json").read_text())
    assert m["model_flags_from"] == "preset toy" and m["model"]["cond_opt"] == "discrete_zero_uniform"


def test_noisy_tree_needs_no_label_resize(toy, trained, tmp_path):
    tree = tmp_path / "ds"
    run([sys.executable, "-m", "image_process.downsample", "--dataset_mode", "folder", "--data_dir", toy,
         "--out_dir", tree, "--size", 8, "--image_size", 32, "--quiet"])
    assert Image.open(next((tree / "test" / "labels").iterdir())).size == (8, 8)
    res = tmp_path / "res"
    p = sample(trained / "model000002.pt", tree, res)
    assert "corruption.json" in p.stderr and "--label_resize True" in p.stderr
    m = json.loads((res / "manifest.json").read_text())
    assert m["labels"]["corruption"]["noise"] == "downsample" and m["labels"]["corruption"]["params"] == {"size": 8}
    assert m["sampling"]["label_resize"] is True
    assert len(list((res / "samples").glob("*.png"))) == 4
    # the label maps written are at the model's size, coloured with the toy palette
    assert Image.open(next((res / "labels_color").iterdir())).size == (32, 32)


def test_bad_checkpoint_leaves_no_results_folder(toy, trained, tmp_path):
    p = sample(tmp_path / "missing" / "model000002.pt", toy, tmp_path / "r1", "--preset", "toy", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(trained / "args.json", broken)
    (broken / "model000002.pt").write_bytes(b"not a checkpoint")
    p = sample(broken / "model000002.pt", toy, tmp_path / "r2" / "deep", check=False)
    assert p.returncode == 2 and "cannot be read" in p.stderr and "Traceback" not in p.stderr
    (broken / "args.json").write_text("{not json")
    p = sample(broken / "model000002.pt", toy, tmp_path / "r3", check=False)
    assert p.returncode == 2 and "run config" in p.stderr and "args.json" in p.stderr
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def test_ema_of_a_short_run_warns(toy, trained, tmp_path):
    p = sample(trained / "ema_0.9999_000002.pt", toy, tmp_path / "r", "--num_samples", 1)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert len(line) == 1 and "model000002.pt" in line[0] and "--ema_warmup True" in line[0]


def test_report_carries_the_manifest(sampled, tmp_path, monkeypatch):
    from evaluations import report as report_mod
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no weights: metrics are skipped
    res, _ = sampled
    report_mod.main(["--results", str(res), "--out-prefix", str(tmp_path / "rep")])
    written = json.loads((tmp_path / "rep.json").read_text())
    manifest = json.loads((res / "manifest.json").read_text())
    assert written["manifest"] == manifest and written["manifest_status"] == "ok"
    md = (tmp_path / "rep.md").read_text()
    assert "Samples made with:" in md and manifest["checkpoint"]["sha256"][:12] in md
    assert "- respacing: ddim2" in md and "- guidance s: 1.0" in md


# ------------------------------------------------------------------------------ units (no training)
def test_given_flags_sees_defaults_given_explicitly():
    given = run_config.given_flags(image_sample.create_argparser,
                                   ["--s", "1.0", "--use_ddim", "--num_classes", "-1", "--clip_denoised", "True"])
    assert given == {"s", "use_ddim", "num_classes", "clip_denoised"}
    assert run_config.given_flags(image_sample.create_argparser, []) == set()


def test_every_sampler_flag_has_help():
    parser = image_sample.create_argparser()
    for action in parser._actions:  # noqa: SLF001 (argparse has no public list)
        assert action.help, action.option_strings
    text = parser.format_help()
    assert text.count("(required)") == 3 and "(default: 1.0)" in text


def test_ema_initial_share():
    assert run_config.ema_initial_share(0.9999, 2) == pytest.approx(0.9998)
    assert run_config.ema_initial_share(0.9999, 100_000) < 0.5
    assert run_config.ema_initial_share(0.9999, 2, warmup=True) < 0.05  # decays 1/10, 2/11
    cfg = run_config.RunConfig(Path("args.json"), {"ema_warmup": True})
    assert run_config.ema_warning("run/ema_0.9999_000002.pt", cfg) is None
    assert "model000002.pt" in run_config.ema_warning("run/ema_0.9999_000002.pt")
    assert run_config.ema_warning("run/model000002.pt") is None


def test_palettes():
    toy = palette("toy", 8, 7)
    assert np.array_equal(toy[:7], TOY_COLORS[:7]) and toy[7].tolist() == [0, 0, 0]
    ade = palette("ade20k", 151, 150)
    assert ade.shape == (151, 3) and ade.dtype == np.uint8 and ade[150].tolist() == [0, 0, 0]
    assert ade[:150].max(1).min() >= 150  # bright: nothing but unlabeled is near black
    assert len({tuple(c) for c in ade[:150]}) == 150
    celeba = palette("celeba", 19)
    assert celeba.max(1).min() > 0 and np.array_equal(celeba, spread_colors(19))
    assert np.array_equal(palette("coco", 183, 182), palette("coco", 183, 182))  # deterministic


def test_palette_name_recognises_the_toy_data(toy, tmp_path):
    assert palette_name("folder", toy) == "toy"
    assert palette_name("folder", tmp_path) == "folder" and palette_name("ade20k", None) == "ade20k"


def test_sample_loop_reports_every_step():
    flags = dict(TINY_FLAGS, timestep_respacing="5")
    model, diffusion = create_model_and_diffusion(**flags)
    y = random_label_map(2, 4, 16, 16)
    calls = []
    sample_loop(model.eval(), diffusion, (2, 3, 16, 16), y, on_step=lambda: calls.append(1))
    assert len(calls) == diffusion.num_timesteps == 5


def test_class_schedule_of_a_moved_run(tmp_path):
    (tmp_path / "class_schedule.npy").write_bytes(b"x")
    model = tmp_path / "model000001.pt"
    assert run_config.class_schedule_path("/gone/class_schedule.npy", model) == str(tmp_path / "class_schedule.npy")
    (tmp_path / "elsewhere.npy").write_bytes(b"y")
    assert run_config.class_schedule_path(str(tmp_path / "elsewhere.npy"), model) == str(tmp_path / "elsewhere.npy")


def test_a_run_whose_class_schedule_is_gone_says_so_and_takes_a_given_one(tmp_path):
    """Not "--class_schedule X: file not found" for a flag nobody gave: the run config is named."""
    from scdm.script_util import model_and_diffusion_defaults
    defaults = model_and_diffusion_defaults()
    flags = dict(defaults, cond_opt="discrete_zero_classwise", cond_diffuse=True,
                 class_schedule=str(tmp_path / "gone.npy"))
    (tmp_path / "args.json").write_text(json.dumps(flags))
    model = tmp_path / "model000001.pt"
    with pytest.raises(run_config.UserError, match=r"^the run config .*args.json names the class schedule .*gone.npy, "
                                                   r"which no longer exists, .* pass --class_schedule PATH.npy$"):
        run_config.resolve_model_flags(defaults, set(), model)
    values, _ = run_config.resolve_model_flags(dict(defaults, class_schedule="mine.npy"), {"class_schedule"}, model)
    assert values["class_schedule"] == "mine.npy"
    (tmp_path / "args.json").write_text(json.dumps(dict(flags, cond_opt="discrete_zero_uniform")))
    assert run_config.resolve_model_flags(defaults, set(), model)[0]["cond_opt"] == "discrete_zero_uniform"


def test_manifest_differences_name_the_settings():
    old = {"format": 1, "checkpoint": {"sha256": "ab" * 32, "path": "/a"}, "sampling": {"s": 1.5, "batch_size": 4},
           "model": {"num_channels": 32}, "code": {"git_commit": "1"}}
    new = {"format": 1, "checkpoint": {"sha256": "cd" * 32, "path": "/b"}, "sampling": {"s": 3.0, "batch_size": 8},
           "model": {"num_channels": 32}, "code": {"git_commit": "2"}}
    assert results_folder.manifest_differences(old, new) == ["model sha256: abababababab.. -> cdcdcdcdcdcd..",
                                                           "s: 1.5 -> 3.0"]
    assert results_folder.manifest_differences(old, old) == []


@pytest.mark.parametrize("change, words", [
    ({"num_classes": None}, "num_classes is null; expected an integer"),
    ({"image_size": "abc"}, 'image_size is "abc"; expected an integer'),
    ({"learn_sigma": "maybe"}, 'learn_sigma is "maybe"; expected true or false'),
    ({"dropout": [0.1]}, "dropout is [0.1]; expected a number"),
])
def test_a_run_config_with_a_wrong_typed_value_is_one_line(tmp_path, change, words):
    from tiny_run import make_tiny_run
    model = make_tiny_run(tmp_path / "run")
    flags = json.loads((tmp_path / "run" / "args.json").read_text())
    (tmp_path / "run" / "args.json").write_text(json.dumps(dict(flags, **change)))
    (tmp_path / "maps").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "maps" / "a.png")
    for module, args in [("scdm.image_sample", ["--model_path", model, "--data_dir", tmp_path, "--results_path",
                                                tmp_path / "out"]),
                         ("scdm.generate", ["--model_path", tmp_path / "run", "--labels", tmp_path / "maps", "--out",
                                            tmp_path / "gen"])]:
        p = in_process_if_cli([sys.executable, "-m", module, *args])
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert words in p.stderr.strip().splitlines()[-1] and "args.json" in p.stderr, p.stderr


def test_compile_samples_what_the_eager_model_samples(toy, trained, sampled, tmp_path):
    """--compile True end to end: torch.compile (inductor) really runs, in one graph per shape (the model
    traces FastPaths.for_compile()), and gives the eager model's samples up to rounding."""
    from scdm.fast.performance import compile_unavailable_reason
    from scdm.fast.fast_paths import FastPaths
    import torch
    reason = compile_unavailable_reason(torch.nn.Linear(1, 1))
    if reason and not in_ci():
        pytest.skip(f"torch.compile cannot run here: {reason}")
    assert not reason, reason
    eager, _ = sampled
    res = tmp_path / "compiled"
    # one batch of all 4 maps: one shape, one compilation
    p = sample(trained / "model000002.pt", toy, res, "--compile", "True", "--batch_size", "4")
    assert "torch.compile" not in p.stderr, p.stderr  # neither "not available" nor "failed": it compiled
    m = json.loads((res / "manifest.json").read_text())
    assert m["sampling"]["compile"] is True
    diffs = [np.abs(np.asarray(Image.open(f)).astype(int) - np.asarray(Image.open(eager / "samples" / f.name)))
             for f in sorted((res / "samples").glob("*.png"))]
    assert len(diffs) == 4
    tolerance = 2 if m["sampling"]["precision"] == "fp32" else 12  # levels of 255: rounding, not another image
    assert max(int(d.max()) for d in diffs) <= tolerance and np.mean([d.mean() for d in diffs]) < 0.5
    assert FastPaths().for_compile().spade_enabled is False  # no label tables to build inside the trace
