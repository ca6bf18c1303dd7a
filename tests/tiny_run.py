"""A tiny random-weight run folder (checkpoint + args.json) that the pipeline, generate and the app load."""
import torch

from scdm.runtime.fileio import save_torch, write_json
from scdm.script_util import create_model_and_diffusion

TINY_RUN = dict(
    dataset_mode="folder", image_size=16, num_classes=4, unlabeled_id=3, num_channels=32, num_res_blocks=1,
    channel_mult="1,2", attention_resolutions="8", num_head_channels=16, learn_sigma=True, no_instance=True,
    resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=50, noise_schedule="linear",
    cond_diffuse=True, cond_opt="discrete_zero_uniform",
)


def make_tiny_run(folder, **overrides):
    """Writes <folder>/model000000.pt and args.json; returns the checkpoint path."""
    flags = dict(TINY_RUN, **overrides)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    path = folder / "model000000.pt"
    save_torch(model.state_dict(), path)
    write_json(dict(flags, data_dir=""), folder / "args.json")
    return path
