"""The one table of flags: every flag of `scdm.image_train`, `scdm.image_sample`, `scdm.generate` and
`scdm.app` is declared here once (name, released default, parse-time type with its range, help), in the
table of the config it belongs to. The command lines are built from these tables (`add_flags`), the parsed values become
frozen configs (`config_class`), and the run config (args.json), the "given on the command line"
check and `create_model_and_diffusion`'s defaults all derive from the same rows, so parsing and the
library cannot disagree about a default or a limit.

Released flag names and defaults are kept; flags that only the released scripts need are marked
"released:" in their help.
"""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from .runtime.cli import (add_bool_argument, device_name, float_in, int_at_least, int_list, minus_one_or_positive,
                          nonnegative_float, nonnegative_int, one_of, positive_float, positive_int, probability,
                          rate_list, respacing, str2bool)
from .data.dataset_layouts import LAYOUTS
from .diffusion.gaussian_diffusion import NOISE_SCHEDULES
from .diffusion.label_diffusion import COND_OPTS
from .fast.performance import PRECISION_CHOICES
from .presets import PRESETS, SAMPLING
from .diffusion.sampling import MAX_EXTRAPOLATION, MAX_GUIDANCE, SAMPLERS

# Formats the default as nothing: help lines that say their default in words get no "(default: ...)".
NO_DEFAULT_LINE = "%(default).0s"
_PRECISIONS = ("fp32, fp16 or bf16 (autocast on fp32 weights), or auto: fp16 on a GPU for a --use_fp16 True model "
               "(the released fp16), bf16 on a CPU with native bf16 (avx512_bf16 or amx_bf16), else fp32")
PRECISION_HELP = {
    "train": _PRECISIONS + "; auto keeps training on a CPU in fp32; empty: fp16 with --use_fp16 True, else fp32",
    "sample": _PRECISIONS + "; the log and manifest.json say what ran; empty: fp16 with --use_fp16 True, else fp32",
    "auto": _PRECISIONS + "; the log says what ran",
}
# The training sample grids: label maps per grid and their few-step respacing.
DEFAULT_MAPS = 4
DEFAULT_RESPACING = "ddim10"


@dataclass(frozen=True)
class Flag:
    name: str
    default: object
    type: Optional[Callable]    # argparse `type=`: the checked type and range (None: the default's type)
    help: str
    choices: Optional[tuple] = None
    metavar: Optional[str] = None
    required: bool = False
    nargs: Optional[str] = None     # argparse `nargs=`, e.g. "+" for a list of paths

    def with_help(self, text):
        return dataclasses.replace(self, help=text)

    def required_flag(self):
        """The same flag where a command line must give it (argparse `required=True`)."""
        return dataclasses.replace(self, required=True)

    def with_default(self, value):
        """The same flag (type, range, help) with another tool's default, e.g. generate's released 25-step
        setting where the sampler keeps the released flag default."""
        return dataclasses.replace(self, default=value)


def class_count(v):
    """argparse `type=` of --num_classes: -1 (from the dataset) or at least 2 classes."""
    x = int_at_least(-1)(v)
    if x in (0, 1):
        raise argparse.ArgumentTypeError(f"-1 (from the dataset) or a class count >= 2 expected, got {v!r}")
    return x


MODEL_FLAGS = (
    Flag('image_size', 64, int_at_least(8),
         'image side in pixels (square images)'),
    Flag('num_classes', 151, class_count,
         'label classes, the unlabeled one included; the model gets one one-hot channel per class (plus an '
         'edge channel unless --no_instance); -1: from the dataset layout (or <data_dir>/dataset.json)'),
    Flag('num_channels', 128, positive_int,
         'base channel count of the UNet'),
    Flag('num_res_blocks', 2, positive_int,
         'residual blocks per resolution'),
    Flag('channel_mult', '', int_list,
         'comma-separated channel multipliers per resolution, e.g. 1,1,2,2,4,4; empty: the default for '
         '--image_size'),
    Flag('num_heads', 4, positive_int,
         'attention heads (used when --num_head_channels is -1)'),
    Flag('num_head_channels', -1, minus_one_or_positive,
         'channels per attention head; -1: a fixed number of heads (--num_heads)'),
    Flag('num_heads_upsample', -1, minus_one_or_positive,
         'released: attention heads in the decoder; -1: same as --num_heads'),
    Flag('attention_resolutions', '16,8', int_list,
         'comma-separated resolutions in pixels that get self-attention, e.g. 32,16,8'),
    Flag('dropout', 0.0, float_in(0.0, 1.0, hi_open=True),
         'dropout rate inside the residual blocks'),
    Flag('class_cond', True, None,
         'released: must stay True (SCDM models are conditioned on a label map)'),
    Flag('use_checkpoint', False, None,
         'gradient checkpointing: less memory, about a third slower'),
    Flag('use_scale_shift_norm', True, None,
         'the timestep embedding scales and shifts the normalised features (released: True)'),
    Flag('resblock_updown', False, None,
         'residual blocks for up- and downsampling (released: True)'),
    Flag('use_fp16', False, None,
         'released: run the model in fp16; here fp16 autocast (training: with a grad scaler on fp32 master '
         'weights; same checkpoint layout), the same as --precision fp16'),
    Flag('use_new_attention_order', False, None,
         'split q, k, v before the heads instead of after (released: False)'),
    Flag('no_instance', False, None,
         'no instance-edge channel in the model input (ADE20K has no instance maps)'),
    Flag('dataset_mode', '', one_of("", *LAYOUTS),
         'required for training: the dataset layout, ade20k, coco, celeba, cityscapes or folder (sets the class '
         'count and the unlabeled class)'),
)
DIFFUSION_FLAGS = (
    Flag('learn_sigma', False, None,
         'the model also predicts the variance (6 output channels; released: True)'),
    Flag('diffusion_steps', 1000, positive_int,
         'number of diffusion steps T of training'),
    Flag('noise_schedule', 'linear', one_of(*NOISE_SCHEDULES),
         'beta schedule: linear or cosine'),
    Flag('timestep_respacing', '', respacing,
         'use a subset of the T steps when sampling: e.g. ddim25 or 250; empty: all of them'),
    Flag('use_kl', False, None,
         'released: train on the variational bound instead of the noise MSE'),
    Flag('predict_xstart', False, None,
         'the model predicts x0 instead of the noise'),
    Flag('rescale_timesteps', False, None,
         'released: the model sees timesteps scaled to 0..1000 whatever T is'),
    Flag('rescale_learned_sigmas', False, None,
         'released: with --learn_sigma, scale the variational-bound term as the released hybrid loss does'),
    Flag('cond_diffuse', False, None,
         'diffuse the label map too (SCDM); False: plain SDM conditioning on the clean map'),
    Flag('cond_opt', '', one_of(*COND_OPTS),
         'label diffusion: discrete_zero_classwise (SCDM, needs --class_schedule), discrete_zero_uniform, or '
         'empty for Gaussian noise'),
    Flag('class_schedule', '', None,
         'per-class lambda .npy for discrete_zero_classwise (the released *_psiphi.npy, or one made by `python '
         '-m scdm.class_schedule`)'),
    Flag('unlabeled_id', -1, int_at_least(-1),
         "class id of 'unlabeled' (it always diffuses uniformly); -1: from --dataset_mode (ade20k 150, coco "
         '182, folder: its dataset.json, else none)'),
)

TRAIN_FLAGS = (
    Flag('data_dir', '', None,
         'required: the dataset root, in the layout of --dataset_mode'),
    Flag('schedule_sampler', 'uniform', one_of("uniform", "loss-second-moment"),
         'how training timesteps are drawn: uniform or loss-second-moment (released)'),
    Flag('lr', 0.0001, positive_float,
         'AdamW learning rate'),
    Flag('weight_decay', 0.0, nonnegative_float,
         'AdamW weight decay'),
    Flag('lr_anneal_steps', 0, nonnegative_int,
         'released: decay the learning rate linearly to 0 over this many steps and stop there; 0: constant'),
    Flag('batch_size', 1, positive_int,
         'images per process and step (the global batch is this times the number of processes)'),
    Flag('microbatch', -1, minus_one_or_positive,
         'released: split each batch into chunks of this size and accumulate their gradients (same update, '
         'less memory); -1: no split'),
    Flag('ema_rate', '0.9999', rate_list,
         'comma-separated EMA decay rates; each writes ema_RATE_STEP.pt'),
    Flag('drop_rate', 0.0, float_in(0.0, 1.0, hi_open=True),
         'classifier-free guidance training: probability of replacing a label map by the all-zero map '
         '(released fine-tuning: 0.2)'),
    Flag('log_interval', 10, positive_int,
         'steps between lines of log.txt and progress.csv'),
    Flag('save_interval', 10000, positive_int,
         'steps between checkpoint sets (model, EMA per rate, optimizer)'),
    Flag('resume_checkpoint', '', None,
         'auto: continue from the newest complete checkpoint set in --log_dir (a fresh run when it holds '
         'none); a model*.pt path: continue from it; empty: a fresh run, refused when --log_dir already holds '
         'one'),
    Flag('fp16_scale_growth', 0.001, nonnegative_float,
         'released: loss-scale growth rate of its fp16 trainer; here the grad scaler doubles its scale after '
         'round(1/this) good steps (0: 2000)'),
    Flag('is_train', True, None,
         'released: read the training split with training augmentation (keep True)'),
    Flag('log_dir', '', None,
         'where checkpoints, log.txt, progress.csv and args.json go; empty: $OPENAI_LOGDIR, else logs/scdm'),
    Flag('num_workers', 2, nonnegative_int,
         'data loader processes per rank'),
    Flag('max_steps', 0, nonnegative_int,
         "stop at this step (a resumed run counts from its checkpoint's step); 0: no limit"),
    Flag('precision', '', one_of("", *PRECISION_CHOICES), PRECISION_HELP["train"]),
    Flag('max_bad_steps', 50, positive_int,
         'stop (exit 1, keeping the last good checkpoint) after this many consecutive steps with a non-finite '
         'loss or gradient'),
    Flag('seed', 0, nonnegative_int,
         'random seed (each rank adds its rank)'),
    Flag('compile', False, None,
         'torch.compile the model (falls back to eager with a warning where it cannot)'),
    Flag('disable_fast_paths', '', None,
         "debugging: 'all' or comma-separated names of scdm.fast.fast_paths.FastPaths to turn off"),
    Flag('ema_warmup', False, None,
         'EMA decay min(rate, (1 + step) / (10 + step)), so that short runs get a usable EMA (the released '
         'models were trained without it)'),
    Flag('allow_partial_resume', False, None,
         'resume from a checkpoint set that lacks its optimizer or an EMA file (for an --ema_rate the run did '
         'not have): the missing state restarts (EMA from the model weights, optimizer from scratch); without '
         'it such a resume is refused'),
    Flag('dry_run', False, None,
         'check the flags, the data, the resume and --log_dir, then exit without training (scripts run this '
         'before long preparations)'),
    Flag('verbose', False, None,
         'also print each fast-path choice (always in LOG_DIR/log.txt; the console gets one summary line)'),
    Flag('sample_interval', 0, nonnegative_int,
         'steps between sample grids LOG_DIR/samples/step_NNNNNN.png (fixed maps, clean and with DS, Edge and '
         'Random noise, EMA and raw weights, fixed seeds; also at every save), drawn by rank 0; 0: none'),
    Flag('sample_maps', DEFAULT_MAPS, positive_int,
         'label maps in each sample grid (the first of the test split, else of the training split)'),
    Flag('sample_respacing', DEFAULT_RESPACING, respacing,
         'the few steps of the sample grids: a DDIM respacing such as ddim10 (see --timestep_respacing)'),
    Flag('tensorboard', True, None,
         'write TensorBoard event files into --log_dir (when tensorboard is installed; a note says so when it '
         'is not)'),
    Flag('wandb', '', None,
         'also log to Weights & Biases under this project (when wandb is installed; WANDB_MODE=offline is '
         'honoured); empty: off'),
)
SAMPLE_FLAGS = (
    Flag('data_dir', '', None,
         '(required) dataset root, or a noisy tree made by image_process (its corruption.json turns on '
         '--label_resize)'),
    Flag('clip_denoised', True, None,
         'clip the x0 estimate to [-1, 1] at every step (released; not used with --dynamic_threshold)'),
    Flag('num_samples', -1, minus_one_or_positive,
         'label maps to sample, in name order; -1: the whole split'),
    Flag('batch_size', 1, positive_int,
         'label maps per model call; samples do not depend on it (per-image seeds)'),
    Flag('model_path', '', None,
         '(required) model*.pt or ema_*.pt, or a run folder (its newest checkpoint, EMA when saved); its '
         'args.json gives the model flags (released checkpoints: --preset)'),
    Flag('results_path', '', None,
         '(required) output folder; it gets manifest.json, and a rerun into it must use the same settings'),
    Flag('is_train', False, None,
         'sample the training split, with its random crop and flip (released); False: the test split'),
    Flag('s', 1.0, float_in(0.0, MAX_GUIDANCE),
         'classifier-free guidance scale: eps(x, 0) + s (eps(x, y) - eps(x, 0)); 1: no guidance (released 1.5)'),
    Flag('extrapolation', 0.0, float_in(0.0, MAX_EXTRAPOLATION),
         'x0 extrapolation e: x0 + e (x0 - previous x0); 0: off (released 25-step setting 0.8)'),
    Flag('dynamic_threshold', 0.0, float_in(0.0, 1.0, hi_open=True),
         'percentile p of the dynamic thresholding of x0; 0: plain clipping (released 25-step setting 0.95)'),
    Flag('seed', 0, nonnegative_int,
         'seed of the per-image noise (each label map and set has its own stream)'),
    Flag('unlabeled_to_zero', False, None,
         'the unlabeled class becomes the all-zero [MASK] vector (as in training with it)'),
    Flag('label_resize', False, None,
         'accept label maps of another size than their images, nearest-resized (the DS benchmark); on by '
         'itself for a tree with corruption.json'),
    Flag('use_ddim', False, None,
         'DDIM updates instead of ancestral ones (use with a respacing such as ddim25)'),
    Flag('eta', 0.0, probability,
         'DDIM noise: 0 deterministic, 1 as ancestral'),
    Flag('num_sets', 1, positive_int,
         'sample sets K per label map: samples_0..samples_{K-1} (samples/ is set 0), for LPIPS diversity'),
    Flag('use_ema', False, None,
         'with a model*.pt path, sample the EMA file of the same step (ema_<--ema_rate>_<step>.pt)'),
    Flag('ema_rate', '0.9999', rate_list,
         'the EMA rate whose file --use_ema picks'),
    Flag('num_workers', 0, nonnegative_int,
         'data-loading processes'),
    Flag('precision', 'auto', one_of("", *PRECISION_CHOICES), PRECISION_HELP["sample"]),
    Flag('compile', False, None,
         'torch.compile the model (falls back to eager where it cannot)'),
    Flag('disable_fast_paths', '', None,
         "'all' or comma-separated names of scdm.fast.fast_paths.FastPaths to turn off (debugging)"),
    Flag('verbose', False, None,
         'print each fast-path choice (by default one summary line)'),
    Flag('batch_invariant', False, None,
         'run the network one image at a time, so each file is byte-identical whatever --batch_size, the '
         'process count or the resume point (on one machine; slower by what batching saves, see '
         'docs/sampling.md); False: batches, which may change a sample by a rounding step'),
    Flag("sampler", "", None,
         f"reverse-process update, one of {', '.join(SAMPLERS)}: ancestral (released), ddim, or dpm++2m "
         "(DPM-Solver++(2M), a second-order multistep ODE solver for few steps, with --timestep_respacing logsnrN, "
         "e.g. logsnr10), dpm++2m-sde (its stochastic variant); one model call per respaced step for each (default: "
         "ddim with --use_ddim True, else ancestral)", choices=("", *SAMPLERS), metavar="NAME"),
    Flag("preset", "", None,
         f"model flags of a released checkpoint (no args.json beside it): {', '.join(PRESETS)}; a run config beside "
         "the checkpoint wins (default: none)", choices=("", *PRESETS), metavar="NAME"),
    Flag("overwrite", False, None,
         "start over in a --results_path written with other settings: removes what the sampler wrote there (the "
         "folders and files its manifest.json lists as outputs) and nothing else"),
    Flag("seed_align", True, None,
         "released flag: the same random draws for a map in clean and noisy runs; here always so, since every image "
         "draws from its own seeded stream (False is refused)"),
)

# ----- the Python pipeline and its command lines (scdm.generate, scdm.app) -------------------------
_SAMPLING_ROW = {f.name: f for f in SAMPLE_FLAGS}
_RELEASED_25 = SAMPLING["25"]

# Which checkpoint SCDMPipeline.from_checkpoint loads, and how.
LOAD_FLAGS = (
    _SAMPLING_ROW["model_path"].with_help(
        "(required) model*.pt or ema_*.pt, or a run folder (its newest checkpoint, EMA when saved); its args.json "
        "gives the model (released checkpoints: --preset)").required_flag(),
    Flag("preset", "", None, f"model flags of a released checkpoint without args.json: {', '.join(PRESETS)}",
         choices=("", *PRESETS), metavar="NAME"),
    Flag("class_schedule", "", None, "class schedule .npy (default: the run's)" + NO_DEFAULT_LINE),
    Flag("use_ema", False, None, "with a model*.pt path, use the EMA file of the same step"),
    Flag("device", "", device_name, "torch device, e.g. cpu or cuda:0 (default: cuda when available)"
         + NO_DEFAULT_LINE),
    Flag("precision", "auto", one_of("", *PRECISION_CHOICES), PRECISION_HELP["auto"]),
)

# The pipeline's sampling settings: the released 25-step setting (ancestral updates on the ddim25 grid).
# SCDMPipeline.__call__, scdm.generate and the painter take their defaults from these rows.
PIPELINE_FLAGS = (
    Flag("steps", 25, positive_int, "sampling steps"),
    _SAMPLING_ROW["s"].with_default(_RELEASED_25["s"]),
    _SAMPLING_ROW["seed"],
    Flag("sampler", "ancestral", None, "reverse-step update", choices=SAMPLERS),
    _SAMPLING_ROW["eta"],
    Flag("extrapolation", None, float_in(0.0, MAX_EXTRAPOLATION),
         f"x0 extrapolation e (0: off; default: {_RELEASED_25['extrapolation']}, 0 with dpm++2m)" + NO_DEFAULT_LINE),
    _SAMPLING_ROW["dynamic_threshold"].with_default(_RELEASED_25["dynamic_threshold"]),
    Flag("unlabeled_to_zero", None, str2bool,
         "unlabeled pixels become SCDM's [MASK] state (holes the model fills); default: True for a model with label "
         "diffusion (SCDM), False (the unlabeled class) for one without, as in the Python pipeline and the painter"
         + NO_DEFAULT_LINE),
    Flag("batch_size", 4, positive_int,
         "samples sampled together (with --batch_invariant True the files do not depend on it)"),
    Flag("batch_invariant", True, None,
         "one network call per image: the same bytes whatever the batch, as the pipeline and the painter give; "
         "False batches the calls (faster on a GPU, same images up to rounding)"),
)

GENERATE_FLAGS = (
    Flag("labels", None, None, "(required) label map files, or folders whose images are all label maps",
         metavar="PATH", required=True, nargs="+"),
    Flag("out", None, None, "(required) output folder (samples/, labels_color/, side_by_side/)", required=True),
    Flag("num_samples", 1, positive_int, "samples per label map"),
    Flag("raw_ids", False, None,
         "maps hold stored dataset ids, remapped by the layout (ADE20K 0 -> unlabeled, k -> k-1; COCO 255 -> "
         "unlabeled)"),
)

APP_FLAGS = (
    Flag("host", "127.0.0.1", None, "address to bind (0.0.0.0: every interface)"),
    Flag("port", 7860, int_at_least(0, at_most=65535), "port (0: any free one)"),
    Flag("queue", 4, positive_int, "jobs that may wait behind the running one"),
    Flag("max_steps", None, positive_int,
         "most sampling steps a job may ask for (default: the model's diffusion steps)" + NO_DEFAULT_LINE),
)

# What the command lines (not the library) default differently: the class count comes from the dataset.
CLI_DEFAULTS = dict(num_classes=-1)
# How the sampler's help describes the default of a model flag (the run's own value wins).
SAMPLING_TIME_DEFAULTS = dict(
    timestep_respacing="(default: %(default)r: all steps)",
    class_schedule="(default: the run's, e.g. class_schedule.npy beside --model_path; may point elsewhere)"
                   + NO_DEFAULT_LINE,
    use_fp16="(default: the run's, else %(default)r; with --precision auto: fp16 on a GPU; an explicit --precision "
             "wins)",
    use_checkpoint="(not used when sampling; default: %(default)r)",
)


def for_command_line(flags):
    """The flags with the command lines' defaults (`CLI_DEFAULTS`)."""
    return tuple(dataclasses.replace(f, default=CLI_DEFAULTS[f.name]) if f.name in CLI_DEFAULTS else f
                 for f in flags)


def as_sampling_flag(flag):
    """A model or diffusion flag as the sampler offers it: its value comes from the checkpoint's run."""
    text = flag.help if "%(" in flag.help else flag.help.replace("%", "%%")
    suffix = SAMPLING_TIME_DEFAULTS.get(
        flag.name, "(default: from args.json beside --model_path, or --preset; else %(default)r)")
    return flag.with_help(f"{text} {suffix}")


LAUNCH_FLAGS = (
    Flag("gpus_per_node", None, positive_int,
         "accepted for the released scripts; ignored: the number of processes comes from the launcher (mpiexec -n, "
         "torchrun --nproc_per_node) and each uses one device"),
    Flag("gpu", None, nonnegative_int,
         "the CUDA device of a single-process run (released flag); under a launcher each process takes its local "
         "rank's GPU"),
)

def by_name(*tables):
    return {f.name: f for table in tables for f in table}


def defaults(*tables):
    """{name: released default} of the tables' flags, in table order."""
    return {f.name: f.default for table in tables for f in table}


def add_flags(parser, flags):
    """One argparse option per flag; booleans take `--flag`, `--flag True` or `--flag False`. A help
    line that states its default in words gets no "(default: ...)" of its own."""
    for f in flags:
        text = f.help
        if "(default:" in text or text.startswith(("(required)", "required:")):
            text += NO_DEFAULT_LINE
        if isinstance(f.default, bool) or f.type is str2bool:
            add_bool_argument(parser, f"--{f.name}", default=f.default, help=text)
        else:
            kind = f.type or (str if f.default is None else type(f.default))
            extra = dict(required=True) if f.required else dict(default=f.default)
            parser.add_argument(f"--{f.name}", type=kind, choices=f.choices, metavar=f.metavar, nargs=f.nargs,
                                help=text, **extra)


def config_class(name, *tables, doc=""):
    """A frozen dataclass with one field per flag of `tables` (their defaults): what a parsed command
    line becomes, so that nothing edits it afterwards (a change is `dataclasses.replace`)."""
    fields = [(f.name, object, dataclasses.field(default=f.default)) for table in tables for f in table]
    cls = dataclasses.make_dataclass(name, fields, frozen=True, namespace={
        "__doc__": doc,
        "from_namespace": classmethod(lambda c, ns: c(**{k: getattr(ns, k) for k in c.__dataclass_fields__})),
        "values": lambda self: dataclasses.asdict(self),
        "part": lambda self, table: {f.name: getattr(self, f.name) for f in table},
    })
    return cls


ModelConfig = config_class("ModelConfig", MODEL_FLAGS, doc="The network (the released flag names).")
DiffusionConfig = config_class("DiffusionConfig", DIFFUSION_FLAGS, doc="The image and label forward processes.")
