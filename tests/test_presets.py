"""The one table of presets: the released presets build the released layouts; the CLI prints them."""
import json
import shlex
import subprocess

import pytest
import torch

from scdm.presets import PRESETS, SAMPLING, as_argv, get_preset, main
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


def test_shell_scripts_read_the_table():
    out = subprocess.run(["sh", "scripts/train.sh", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "choose one of: ade20k coco celeba cityscapes toy" in out.stderr
    help_text = subprocess.run(["sh", "scripts/sample.sh", "--help"], capture_output=True, text=True).stdout
    assert "scdm/presets.py" in help_text and "set -eu" not in help_text
