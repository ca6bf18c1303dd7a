"""The one table of presets: the released presets build the released layouts; the CLI prints them."""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from scdm.presets import ALIASES, PRESETS, SAMPLING, STAGES, TRAIN_STAGES, as_argv, get_preset, main
from scdm.script_util import create_model_and_diffusion


@pytest.mark.parametrize("name", ["ade20k", "coco", "celeba"])
def test_released_presets_are_the_released_layouts(compat_dir, name):
    layout = json.loads((compat_dir / f"layout_{name}.json").read_text())
    model_flags = get_preset(name).flags("model")
    assert {k: v for k, v in model_flags.items()} == {k: v for k, v in layout["config"].items() if k != "use_fp16"}
    flags = dict(model_flags, class_schedule=str(compat_dir / f"{name}_psiphi.npy"))
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**flags)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == layout["state_dict_shapes"]


def test_every_preset_builds(tmp_path):
    import numpy as np
    for name, preset in PRESETS.items():
        flags = preset.flags("model")
        schedule = tmp_path / f"{name}.npy"
        np.save(schedule, np.full(flags["num_classes"] if "num_classes" in flags else 8, 2.0))
        extra = {} if "num_classes" in flags else {"num_classes": 8}
        with torch.device("meta"):
            model, diffusion = create_model_and_diffusion(**dict(flags, class_schedule=str(schedule), **extra))
        assert diffusion.num_timesteps == flags["diffusion_steps"]


# What a preset leaves to the user: paths, seeds, GPU counts and sample counts.
NOT_IN_PRESETS = {"data_dir", "resume_checkpoint", "model_path", "results_path", "seed", "gpus_per_node", "num_samples"}
RELEASED_LINE_OF = {"train": "{}-scratch", "resume": "{}-resume", "sample25": "{}-25", "sample1000": "{}-1000"}


def same_flag_value(ours, released):
    """A preset value against the released script's string ("1e-4" vs 0.0001, "True" vs True)."""
    if isinstance(ours, bool) or not isinstance(ours, (int, float)):
        return str(ours) == released
    return float(ours) == float(released)


@pytest.mark.parametrize("stage", sorted(RELEASED_LINE_OF))
@pytest.mark.parametrize("name", ["ade20k", "coco", "celeba"])
def test_every_preset_stage_is_the_released_line(compat_dir, name, stage):
    scripts = json.loads((compat_dir / "released_scripts.json").read_text())
    group = "sample" if stage.startswith("sample") else "train"
    line = scripts[group][RELEASED_LINE_OF[stage].format(name)]
    released = {k: v for k, v in line.items() if k not in NOT_IN_PRESETS}
    ours = get_preset(name).flags(stage)
    if stage == "sample1000":  # the released 1000-step line passes no respacing: all steps, which ours names
        assert ours.pop("timestep_respacing") == "1000"
    assert set(ours) == set(released), \
        f"only ours: {set(ours) - set(released)}, only released: {set(released) - set(ours)}"
    wrong = {k: (ours[k], released[k]) for k in ours if not same_flag_value(ours[k], released[k])}
    assert not wrong, f"{name} {stage}: (ours, released) {wrong}"


def test_released_lines_parse_with_the_released_meaning(compat_dir):
    """Every flag of every released launch line is accepted by our entry point and parses to its value."""
    from scdm.image_sample import create_argparser as sample_parser
    from scdm.image_train import create_argparser as train_parser
    scripts = json.loads((compat_dir / "released_scripts.json").read_text())
    for group, make in (("train", train_parser), ("sample", sample_parser)):
        for line, flags in scripts[group].items():
            args = make().parse_args([w for k, v in flags.items() for w in (f"--{k}", v)])
            for k, v in flags.items():
                assert same_flag_value(getattr(args, k), v), (line, k, getattr(args, k), v)


def test_sdm_recipe_is_a_named_baseline():
    ade = get_preset("ade20k")
    assert "drop_rate" not in ade.flags("sdm-train") and ade.flags("sdm-finetune")["drop_rate"] == 0.2
    assert ade.flags("finetune") == ade.flags("sdm-finetune") and ade.flags("scratch") == ade.flags("train")
    for name in ("cityscapes", "toy"):  # SCDM-style stages too: dropout from scratch
        preset = get_preset(name)
        assert preset.flags("train")["drop_rate"] == 0.2 and preset.flags("resume")["drop_rate"] == 0.2
        assert preset.flags("resume")["lr"] < preset.flags("train")["lr"]


def test_stages_and_errors():
    toy = get_preset("toy")
    assert toy.flags("train")["max_steps"] == 1000 and toy.flags("finetune")["drop_rate"] == 0.2
    assert get_preset("ade20k").flags("sample25")["timestep_respacing"] == SAMPLING["25"]["timestep_respacing"]
    with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
        get_preset("imagenet")
    with pytest.raises(ValueError, match="unknown preset stage"):
        toy.flags("sample7")


def test_cli_prints_parsable_flags(capsys):
    assert main(["coco", "train"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words == as_argv(get_preset("coco").flags("train"))
    from scdm.image_train import create_argparser
    args = create_argparser().parse_args(words)
    assert args.num_classes == 183 and args.no_instance is False and args.use_fp16 is True
    assert main(["toy", "model", "--get", "dataset_mode"]) == 0
    assert capsys.readouterr().out.strip() == "folder"
    assert main(["ade20k", "sample25", "--omit_model"]) == 0
    assert shlex.split(capsys.readouterr().out) == ["--timestep_respacing", "ddim25", "--s", "1.5", "--extrapolation",
                                                    "0.8", "--dynamic_threshold", "0.95", "--batch_size", "10",
                                                    "--use_fp16", "True"]


def test_shell_scripts_read_the_table():
    out = subprocess.run(["sh", "scripts/train.sh", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "choose one of: ade20k coco celeba cityscapes toy" in out.stderr
    help_text = subprocess.run(["sh", "scripts/sample.sh", "--help"], capture_output=True, text=True).stdout
    assert "scdm/presets.py" in help_text and "set -eu" not in help_text


def test_a_closed_pipe_ends_the_cli_quietly():
    """`python -m scdm.presets ... | head -c 0`: no traceback, as scdm.runtime.errors.run_cli handles a closed pipe."""
    import sys
    p = subprocess.run(["sh", "-c", f"'{sys.executable}' -m scdm.presets ade20k train --json | head -c 0"],
                       capture_output=True, text=True)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_our_8_step_schedule_is_a_stage_the_sampler_takes():
    """sample8 (not in the released scripts) parses through image_sample and names a valid sampler setting."""
    from scdm.diffusion.sampling import SamplerSettings
    from scdm.image_sample import create_argparser as sample_parser
    flags = get_preset("toy").flags("sample8")
    args = sample_parser().parse_args(as_argv(flags))
    assert (args.sampler, args.timestep_respacing, args.extrapolation) == ("dpm++2m-sde", "logsnr8", 0.2)
    SamplerSettings(sampler=args.sampler, respacing=args.timestep_respacing, guidance_scale=args.s,
                    extrapolation=args.extrapolation, dynamic_threshold=args.dynamic_threshold)
    assert "sample8" in STAGES


def test_the_shell_scripts_lists_are_the_tables():
    """common.sh names the presets and sample.sh the step counts without starting Python (so --help and
    a wrong name answer at once); both lists must be presets.py's."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    names = re.search(r'^PRESET_NAMES="([^"]*)"', (scripts / "common.sh").read_text(), re.M).group(1).split()
    assert names == list(PRESETS)
    sample = (scripts / "sample.sh").read_text()
    steps = re.search(r'^ +([0-9|]+)\) steps=\$1', sample, re.M).group(1).split("|")
    assert sorted(steps) == sorted(SAMPLING)
    choices = re.search(r'unknown_word "number of steps" "\$1" "([^"]*)"', sample).group(1).split()
    assert sorted(choices) == sorted(SAMPLING)
    train = (scripts / "train.sh").read_text()
    assert re.search(r'unknown_word stage "\$1" "([^"]*)"', train).group(1).split() == list(TRAIN_STAGES)
    words = re.search(r"^ +([a-z|-]+)\) stage=\$1; shift", train, re.M).group(1).split("|")
    assert sorted(words) == sorted([*TRAIN_STAGES, *ALIASES])
    usage = re.search(r"^# Sample with a preset: .*\[([0-9|]+)\]", sample, re.M).group(1).split("|")
    assert sorted(usage) == sorted(SAMPLING)


@pytest.mark.parametrize("script,words,says", [
    ("train.sh", ["toy", "trian"], "unknown stage 'trian'; choose one of: train resume sdm-train sdm-finetune"),
    ("sample.sh", ["toy", "50"], "unknown number of steps '50'; choose one of: 25 1000 8"),
])
def test_a_mistyped_stage_or_step_count_stops_before_anything_is_made(script, words, says, tmp_path):
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(["sh", str(root / "scripts" / script), *words], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, MODEL="m.pt"))
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []  # no toy data, no log folder


def test_num_gpus_must_be_a_count(tmp_path):
    root = Path(__file__).resolve().parents[1]
    for value in ("abc", "0", "-2"):
        p = subprocess.run(["sh", str(root / "scripts" / "train.sh"), "toy"], cwd=tmp_path, capture_output=True,
                           text=True, env=dict(os.environ, NUM_GPUS=value))
        assert p.returncode == 2 and f"NUM_GPUS={value}: expected a whole number" in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []
