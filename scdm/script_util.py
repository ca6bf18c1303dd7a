"""Defaults, model/diffusion construction and argparse helpers, under the released flag names."""
import argparse

import numpy as np

from . import gaussian_diffusion as gd
from .cli import (add_bool_argument, float_in, int_at_least, int_list, minus_one_or_positive, one_of, positive_int,
                  respacing)
from .cli import str2bool  # noqa: F401  (kept importable here)
from .dataset_layouts import LAYOUTS, get_layout
from .label_diffusion import COND_OPTS, DISCRETE_CLASSWISE, load_class_schedule
from .respace import SpacedDiffusion, space_timesteps
from .unet import UNetModel

DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                        64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def diffusion_defaults():
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
        cond_diffuse=False,
        cond_opt="",
        class_schedule="",   # path to the per-class lambda .npy for discrete_zero_classwise
        unlabeled_id=-1,     # -1: from dataset_mode (ade20k 150, coco 182, else none)
    )


def model_and_diffusion_defaults():
    return dict(
        image_size=64,
        num_classes=151,
        num_channels=128,
        num_res_blocks=2,
        channel_mult="",
        num_heads=4,
        num_head_channels=-1,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        class_cond=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        no_instance=False,
        dataset_mode="",
        **diffusion_defaults(),
    )


# Help lines of the flags above, shared by image_train and image_sample. "released:" says what a
# flag did in the released code where ours differs or where the flag is kept only for compatibility.
MODEL_FLAG_HELP = dict(
    image_size="image side in pixels (square images)",
    num_classes="label classes, the unlabeled one included; the model gets one one-hot channel per class "
                "(plus an edge channel unless --no_instance)",
    num_channels="base channel count of the UNet",
    num_res_blocks="residual blocks per resolution",
    channel_mult="comma-separated channel multipliers per resolution, e.g. 1,1,2,2,4,4; empty: the default "
                 "for --image_size",
    num_heads="attention heads (used when --num_head_channels is -1)",
    num_head_channels="channels per attention head; -1: a fixed number of heads (--num_heads)",
    num_heads_upsample="released: attention heads in the decoder; -1: same as --num_heads",
    attention_resolutions="comma-separated resolutions in pixels that get self-attention, e.g. 32,16,8",
    dropout="dropout rate inside the residual blocks",
    class_cond="released: must stay True (SCDM models are conditioned on a label map)",
    use_checkpoint="gradient checkpointing: less memory, about a third slower",
    use_scale_shift_norm="the timestep embedding scales and shifts the normalised features (released: True)",
    resblock_updown="residual blocks for up- and downsampling (released: True)",
    use_fp16="released: run the model in fp16; here fp16 autocast on fp32 weights (same checkpoint layout), "
             "the same as --precision fp16",
    use_new_attention_order="split q, k, v before the heads instead of after (released: False)",
    no_instance="no instance-edge channel in the model input (ADE20K has no instance maps)",
    dataset_mode="dataset layout: ade20k, coco, celeba, cityscapes or folder (sets the class count and the "
                 "unlabeled class)",
    learn_sigma="the model also predicts the variance (6 output channels; released: True)",
    diffusion_steps="number of diffusion steps T of training",
    noise_schedule="beta schedule: linear or cosine",
    timestep_respacing="use a subset of the T steps when sampling: e.g. ddim25 or 250; empty: all of them",
    use_kl="released: train on the variational bound instead of the noise MSE",
    predict_xstart="the model predicts x0 instead of the noise",
    rescale_timesteps="released: the model sees timesteps scaled to 0..1000 whatever T is",
    rescale_learned_sigmas="released: with --learn_sigma, scale the variational-bound term as the released "
                           "hybrid loss does",
    cond_diffuse="diffuse the label map too (SCDM); False: plain SDM conditioning on the clean map",
    cond_opt="label diffusion: discrete_zero_classwise (SCDM, needs --class_schedule), discrete_zero_uniform, "
             "or empty for Gaussian noise",
    class_schedule="per-class lambda .npy for discrete_zero_classwise (the released *_psiphi.npy, or one made "
                   "by `python -m scdm.class_schedule`)",
    unlabeled_id="class id of 'unlabeled' (it always diffuses uniformly); -1: from --dataset_mode (ade20k 150, "
                 "coco 182, folder: its dataset.json, else none)",
)

def class_count(v):
    """argparse `type=` of --num_classes: -1 (from the dataset) or at least 2 classes."""
    x = int_at_least(-1)(v)
    if x in (0, 1):
        raise argparse.ArgumentTypeError(f"-1 (from the dataset) or a class count >= 2 expected, got {v!r}")
    return x


# Parse-time type and range of each model and diffusion flag (a released default passes its own check).
MODEL_FLAG_TYPES = dict(
    image_size=int_at_least(8), num_classes=class_count, num_channels=positive_int, num_res_blocks=positive_int,
    channel_mult=int_list, num_heads=positive_int, num_head_channels=minus_one_or_positive,
    num_heads_upsample=minus_one_or_positive, attention_resolutions=int_list,
    dropout=float_in(0.0, 1.0, hi_open=True), diffusion_steps=positive_int,
    noise_schedule=one_of(*gd.NOISE_SCHEDULES), timestep_respacing=respacing, cond_opt=one_of(*COND_OPTS),
    dataset_mode=one_of("", *LAYOUTS), unlabeled_id=int_at_least(-1),
)

# The flags that fix the network and its diffusion: a resume or a sampler must use the values the
# checkpoint was trained with.
ARCHITECTURE_FLAGS = (
    "image_size", "num_classes", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
    "num_head_channels", "num_heads", "learn_sigma", "no_instance", "resblock_updown", "use_scale_shift_norm",
    "use_new_attention_order", "diffusion_steps", "noise_schedule", "predict_xstart", "cond_diffuse",
    "cond_opt", "dataset_mode",
)


def architecture_conflicts(saved, flags):
    """The architecture flags whose value in `flags` differs from a run's saved config `saved`
    (args.json), as ["name=flag (run: saved)", ...]; flags the saved config lacks are not compared."""
    return [f"{k}={flags[k]} (run: {saved[k]})" for k in ARCHITECTURE_FLAGS
            if k in saved and k in flags and saved[k] != flags[k]]


def resolve_unlabeled_id(unlabeled_id, dataset_mode):
    """The flag when given (>= 0), else the layout's unlabeled class (ade20k 150, coco 182), else None."""
    if unlabeled_id is not None and unlabeled_id >= 0:
        return unlabeled_id
    return get_layout(dataset_mode).unlabeled_class if dataset_mode else None


def create_model_and_diffusion(**kwargs):
    """Build (model, diffusion) from flag values; unknown flags are an error, missing ones default."""
    args = model_and_diffusion_defaults()
    unknown = sorted(set(kwargs) - set(args))
    if unknown:
        raise ValueError(f"unknown model/diffusion flags: {unknown}")
    args.update(kwargs)
    model = create_model(
        args["image_size"], args["num_classes"], args["num_channels"], args["num_res_blocks"],
        channel_mult=args["channel_mult"], learn_sigma=args["learn_sigma"], class_cond=args["class_cond"],
        use_checkpoint=args["use_checkpoint"], attention_resolutions=args["attention_resolutions"],
        num_heads=args["num_heads"], num_head_channels=args["num_head_channels"],
        num_heads_upsample=args["num_heads_upsample"], use_scale_shift_norm=args["use_scale_shift_norm"],
        dropout=args["dropout"], resblock_updown=args["resblock_updown"], use_fp16=args["use_fp16"],
        use_new_attention_order=args["use_new_attention_order"], no_instance=args["no_instance"],
    )
    return model, create_diffusion(**args)


def create_diffusion(**kwargs):
    """The diffusion alone from flag values (model flags are ignored), e.g. to respace it again."""
    args = model_and_diffusion_defaults()
    args.update(kwargs)
    return create_gaussian_diffusion(
        steps=args["diffusion_steps"], learn_sigma=args["learn_sigma"], noise_schedule=args["noise_schedule"],
        use_kl=args["use_kl"], predict_xstart=args["predict_xstart"], rescale_timesteps=args["rescale_timesteps"],
        rescale_learned_sigmas=args["rescale_learned_sigmas"], timestep_respacing=args["timestep_respacing"],
        num_classes=args["num_classes"], cond_diffuse=args["cond_diffuse"], cond_opt=args["cond_opt"],
        class_schedule=args["class_schedule"],
        unlabeled_id=resolve_unlabeled_id(args["unlabeled_id"], args["dataset_mode"]),
    )


def parse_channel_mult(channel_mult, image_size):
    if not channel_mult:
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size={image_size}; pass --channel_mult, e.g. 1,2,4")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, (tuple, list)):
        return tuple(channel_mult)
    try:
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    except ValueError:
        raise ValueError(f"--channel_mult {channel_mult!r}: expected comma-separated numbers such as 1,2,4") from None


def parse_attention_resolutions(attention_resolutions, image_size):
    """Resolutions (e.g. "32,16,8") -> downsample rates at which attention is applied."""
    try:
        res = [int(r) for r in str(attention_resolutions).split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--attention_resolutions {attention_resolutions!r}: expected e.g. 32,16,8") from None
    return tuple(image_size // r for r in res)


def create_model(image_size, num_classes, num_channels, num_res_blocks, channel_mult="", learn_sigma=False,
                 class_cond=True, use_checkpoint=False, attention_resolutions="16", num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0,
                 resblock_updown=False, use_fp16=False, use_new_attention_order=False, no_instance=False):
    if not class_cond:
        raise ValueError("class_cond=False is not supported: SCDM models are conditioned on a label map")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=num_classes if no_instance else num_classes + 1,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_gaussian_diffusion(*, steps=1000, learn_sigma=False, noise_schedule="linear", use_kl=False,
                              predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
                              timestep_respacing="", num_classes=None, cond_diffuse=False, cond_opt="",
                              class_schedule="", unlabeled_id=None):
    if cond_opt not in COND_OPTS:
        raise ValueError(f"unknown --cond_opt {cond_opt!r}; expected one of {[o for o in COND_OPTS if o]} or ''")
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    class_lambdas = None
    if cond_diffuse and cond_opt == DISCRETE_CLASSWISE:
        class_lambdas = load_class_schedule(class_schedule, num_classes, unlabeled_id)
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps], np.cumprod(1.0 - betas)),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        # Released behaviour: the large fixed variance (beta_t) when sigma is not learned.
        model_var_type=gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        num_classes=num_classes,
        cond_diffuse=cond_diffuse,
        cond_opt=cond_opt,
        class_lambdas=class_lambdas,
    )


# ----- argparse helpers ---------------------------------------------------------------------------
def add_dict_to_argparser(parser, default_dict, helps=None, types=None):
    """One flag per key; booleans take `--flag`, `--flag True` or `--flag False`. A flag without a
    text in `helps` still gets a help line, so that its default shows. `types` gives a flag its
    checked type (range, choices; see `scdm.cli`); the model flags' types are always applied."""
    helps = helps or {}
    types = {**MODEL_FLAG_TYPES, **(types or {})}
    for k, v in default_dict.items():
        text = helps.get(k) or "(default: %(default)s)"
        if isinstance(v, bool):
            add_bool_argument(parser, f"--{k}", default=v, help=text)
        else:
            parser.add_argument(f"--{k}", default=v, type=types.get(k) or (str if v is None else type(v)), help=text)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}
