"""Model and diffusion construction from flag values, under the released names and defaults."""
import numpy as np

from .diffusion import gaussian_diffusion as gd
from .data.dataset_layouts import get_layout
from .flags import DIFFUSION_FLAGS, MODEL_FLAGS, defaults
from .diffusion.label_diffusion import COND_OPTS, DISCRETE_CLASSWISE, load_class_schedule
from .diffusion.respace import SpacedDiffusion, space_timesteps
from .models.unet import UNetModel

DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                        64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def diffusion_defaults():
    """The diffusion flags' released defaults (`scdm.flags.DIFFUSION_FLAGS`)."""
    return defaults(DIFFUSION_FLAGS)


def model_and_diffusion_defaults():
    """Every model and diffusion flag's released default (`scdm.flags`)."""
    return defaults(MODEL_FLAGS, DIFFUSION_FLAGS)


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


def check_image_size(image_size, mult):
    """The UNet halves --image_size once per --channel_mult level after the first."""
    factor = 2 ** (len(mult) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(f"--image_size {image_size} must be a multiple of {factor}: the UNet halves it "
                         f"{len(mult) - 1} time(s) (--channel_mult {','.join(map(str, mult))})")


def attention_note(flags):
    """A warning when --attention_resolutions names resolutions the UNet does not have, which then get
    no attention (allowed, so that runs trained that way still load), or None."""
    size, spec = flags["image_size"], flags["attention_resolutions"]
    rates = [2 ** i for i in range(len(parse_channel_mult(flags["channel_mult"], size)))]
    levels = [size // rate for rate in rates]
    # The UNet attends where its downsample rate is one that parse_attention_resolutions gives.
    wanted = [r.strip() for r in str(spec).split(",") if r.strip()]
    missing = [r for r, rate in zip(wanted, parse_attention_resolutions(spec, size)) if rate not in rates]
    if not missing:
        return None
    where = "nowhere" if len(missing) == len(wanted) else "only at the others"
    return (f"--attention_resolutions {spec}: the UNet has no "
            f"{'/'.join(missing)} px level at --image_size {size} (its levels: "
            f"{','.join(map(str, levels))}), so it attends {where}")


def create_model(image_size, num_classes, num_channels, num_res_blocks, channel_mult="", learn_sigma=False,
                 class_cond=True, use_checkpoint=False, attention_resolutions="16", num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0,
                 resblock_updown=False, use_fp16=False, use_new_attention_order=False, no_instance=False):
    if not class_cond:
        raise ValueError("class_cond=False is not supported: SCDM models are conditioned on a label map")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    mult = parse_channel_mult(channel_mult, image_size)
    check_image_size(image_size, mult)
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=mult,
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
