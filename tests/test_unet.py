"""The network: released layouts, the released output fixture, fp16, checkpointing, input checks."""
import json

import pytest
import torch

from scdm.script_util import create_model_and_diffusion
from scdm.fast.fast_paths import FastPaths

from conftest import random_label_map


@pytest.mark.parametrize("name", ["ade20k", "coco", "celeba"])
def test_released_layouts(compat_dir, name):
    layout = json.loads((compat_dir / f"layout_{name}.json").read_text())
    flags = dict(layout["config"], class_schedule=str(compat_dir / f"{name}_psiphi.npy"))
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**flags)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == layout["state_dict_shapes"]


def _fixture_model(compat_dir):
    fx = torch.load(compat_dir / "unet_small.pt")
    cfg = dict(fx["config"])
    model, _ = create_model_and_diffusion(**cfg)
    model.load_state_dict({k: v.float() for k, v in fx["state_dict"].items()}, strict=True)
    return model.eval(), fx


@pytest.mark.parametrize("fast_paths", [FastPaths(), FastPaths().replace(sdpa_attention=False),
                                        FastPaths.all_off()], ids=["fast", "no_sdpa", "plain"])
def test_reproduces_released_output(compat_dir, fast_paths):
    model, fx = _fixture_model(compat_dir)
    model.fast_paths = fast_paths
    with torch.no_grad():
        out = model(fx["x"], fx["t"], y=fx["y"].float())
    assert out.shape == fx["out"].shape
    assert torch.allclose(out, fx["out"], atol=1e-5, rtol=0)


def test_fp16_model_runs_and_tracks_fp32(tiny_flags):
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**tiny_flags)
    # Non-zero output layers so the comparison is meaningful.
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(2, 3, 16, 16)
    y = random_label_map(2, 4, 16, 16)
    t = torch.tensor([3, 70])
    with torch.no_grad():
        ref = model(x, t, y=y)
        model.convert_to_fp16()
        assert model.input_blocks[0][0].weight.dtype == torch.float16
        out = model(x, t, y=y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_use_fp16_flag_builds_half_torso(tiny_flags):
    model, _ = create_model_and_diffusion(**dict(tiny_flags, use_fp16=True))
    assert model.dtype == torch.float16
    assert model.output_blocks[0][0].in_layers[1].weight.dtype == torch.float16
    assert model.time_embed[0].weight.dtype == torch.float32


def test_checkpointing_gives_same_gradients(tiny_flags):
    torch.manual_seed(0)
    plain, _ = create_model_and_diffusion(**tiny_flags)
    ckpt, _ = create_model_and_diffusion(**dict(tiny_flags, use_checkpoint=True))
    for p in plain.parameters():
        p.data.normal_(0, 0.05)
    ckpt.load_state_dict(plain.state_dict())
    x, y, t = torch.randn(2, 3, 16, 16), random_label_map(2, 4, 16, 16), torch.tensor([5, 50])
    plain(x, t, y=y).square().mean().backward()
    ckpt(x, t, y=y).square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n


def test_label_map_checks(tiny_flags):
    model, _ = create_model_and_diffusion(**tiny_flags)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    with pytest.raises(ValueError, match=r"expects \(B, 5, H, W\)"):
        model(x, t, y=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="does not match the image batch"):
        model(x, t, y=torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="needs a label map"):
        model(x, t)
