"""Switches for the UNet's exact fast paths, held by each model instance.

Every switch keeps the released computation up to floating-point rounding; with all of them off
the model runs the plain (released) computation. The config is frozen and owned by the model, so
two models in one process can differ and nothing changes behind a caller's back; `override`
changes it for a block (debugging, tests, the benchmarks' plain path).
"""
import contextlib
import dataclasses
from dataclasses import dataclass

# Unique-patch evaluation is used only when it saves work: distinct patches / pixels at most this.
UNIQUE_PATCH_MAX_RATIO = 0.5


@dataclass(frozen=True)
class FastPaths:
    sdpa_attention: bool = True        # F.scaled_dot_product_attention instead of einsum + softmax
    spade_gather: bool = True          # one-hot label maps: mlp_shared as a table gather, not a dense conv
    spade_unique_patches: bool = True  # gamma/beta once per distinct 3x3 label patch, then gathered
    fused_gamma_beta: bool = True      # mlp_gamma and mlp_beta as one conv (weights concatenated on the fly)
    null_label_cache: bool = True      # all-zero map (guidance, dropped labels): closed form, cached under no_grad
    shared_encoder: bool = True        # guidance: the label-free encoder runs once for both halves
    channels_last: bool = True         # NHWC activations in the torso

    @classmethod
    def names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def all_on(cls):
        return cls()

    @classmethod
    def all_off(cls):
        return cls(**{name: False for name in cls.names()})

    def replace(self, **names):
        """A copy with the named switches changed; unknown names raise ValueError."""
        unknown = sorted(set(names) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown fast paths {unknown}; known: {sorted(self.names())}")
        return dataclasses.replace(self, **{k: bool(v) for k, v in names.items()})

    @property
    def spade_enabled(self):
        """Whether the norms need the label map prepared as `SpadeLabels` (else the dense tensor)."""
        return self.spade_gather or self.fused_gamma_beta or self.null_label_cache

    def disabled(self):
        return [name for name in self.names() if not getattr(self, name)]


def from_disable_spec(spec: str) -> FastPaths:
    """The config for a `--disable_fast_paths` value: "" (all on), "all", or comma-separated names."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    if names == ["all"]:
        return FastPaths.all_off()
    unknown = sorted(set(names) - set(FastPaths.names()))
    if unknown:
        raise ValueError(f"--disable_fast_paths: unknown fast paths {unknown}; expected 'all' or a comma-separated "
                         f"list of {sorted(FastPaths.names())}")
    return FastPaths().replace(**{name: False for name in names})


def unwrap(model):
    """The model that owns the config, looking through DDP (`.module`) and torch.compile (`._orig_mod`)."""
    for _ in range(8):
        if isinstance(getattr(type(model), "fast_paths", None), property):
            return model
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if inner is None:
            break
        model = inner
    raise TypeError(f"{type(model).__name__} has no fast-path config")


@contextlib.contextmanager
def override(model, enabled=True, **names):
    """Within the block: every switch `enabled` (None: as it is now), then the named ones.
    The previous config is restored afterwards, also when the block raises."""
    owner = unwrap(model)
    previous = owner.fast_paths
    base = previous if enabled is None else (FastPaths.all_on() if enabled else FastPaths.all_off())
    config = base.replace(**names)
    owner.fast_paths = config
    try:
        yield config
    finally:
        owner.fast_paths = previous
