"""scdm: Stochastic Conditional Diffusion Models for robust semantic image synthesis.

The names a user needs, imported on first use (so `import scdm` stays light):

    from scdm import SCDMPipeline
    pipe = SCDMPipeline.from_pretrained("results/quickstart/train/scdm")
    images = pipe("my_map.png", num_samples=2, seed=0)
"""
import importlib

_PUBLIC = {
    "SCDMPipeline": "scdm.pipeline",
    "load_checkpoint": "scdm.loading",
    "create_model_and_diffusion": "scdm.script_util",
    "SamplerSettings": "scdm.diffusion.sampling",
    "sample_batch": "scdm.diffusion.sampling",
    "sample_loop": "scdm.diffusion.sampling",
    "LabelDiffusion": "scdm.diffusion.label_diffusion",
    "PRESETS": "scdm.presets",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'scdm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
