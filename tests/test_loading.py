"""scdm.loading (a checkpoint from Python values) and SamplerSettings (sampling settings checked once),
with the entry points that share them."""

import pytest
import torch

import scdm
from scdm.checkpoint import CheckpointError
from scdm.loading import checkpoint_path, load_checkpoint, resolve_checkpoint
from scdm.diffusion.sampling import MAX_GUIDANCE, SamplerSettings, sample_batch, sample_loop
from tiny_run import TINY_RUN, make_tiny_run

from conftest import run_in_process


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def test_load_checkpoint_gives_the_saved_weights_and_the_run_flags(run_file):
    loaded = load_checkpoint(run_file)
    saved = torch.load(run_file, map_location="cpu", weights_only=True)
    state = loaded.model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert not loaded.model.training
    for k, v in TINY_RUN.items():
        assert loaded.flags[k] == v, k
    assert (loaded.num_classes, loaded.unlabeled_id, loaded.dataset_mode) == (4, 3, "folder")
    assert loaded.source == f"run config {run_file.parent / 'args.json'}"
    assert loaded.diffusion("ddim5").num_timesteps == 5 and loaded.diffusion().num_timesteps == 50
    assert checkpoint_path(run_file.parent) == run_file  # a run folder: its newest checkpoint


def test_a_flag_that_contradicts_the_run_is_refused_by_name(run_file):
    spec = resolve_checkpoint(run_file, flags=dict(num_channels=64))
    with pytest.raises(CheckpointError, match="flags give num_channels=64; the run config .* has num_channels=32"):
        spec.build_model()
    spec = resolve_checkpoint(run_file, flags=dict(noise_schedule="cosine"))  # the weights would load
    with pytest.raises(CheckpointError, match="--noise_schedule cosine contradicts the run"):
        spec.build_model()
    # sampling-time flags may change
    spec = resolve_checkpoint(run_file, flags=dict(timestep_respacing="ddim10"))
    assert spec.diffusion().num_timesteps == 10
    with pytest.raises(ValueError, match=r"unknown model/diffusion flags: \['lr'\]"):
        resolve_checkpoint(run_file, flags=dict(lr=1e-4))


def test_public_api_names_one_object_each():
    from scdm import loading, pipeline
    from scdm.diffusion import sampling
    assert scdm.load_checkpoint is loading.load_checkpoint and scdm.SCDMPipeline is pipeline.SCDMPipeline
    assert scdm.SamplerSettings is sampling.SamplerSettings and scdm.sample_batch is sampling.sample_batch
    assert set(scdm.__all__) <= set(dir(scdm))


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance_scale=MAX_GUIDANCE + 1), "guidance_scale=101.0: expected a number in"),
    (dict(guidance_scale=-0.5), "guidance_scale=-0.5"),
    (dict(dynamic_threshold=1.0), r"dynamic_threshold=1.0: expected a number in \[0, 1\)"),
    (dict(eta=2.0), "eta=2.0"),
    (dict(sampler="euler"), "sampler='euler': expected one of ancestral"),
    (dict(guidance_scale="x"), "guidance_scale='x'"),
])
def test_sampler_settings_refuse_what_no_entry_point_accepts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerSettings(**kwargs)


@pytest.mark.parametrize("module, extra", [
    ("scdm.image_sample", ["--data_dir", "x", "--results_path", "y", "--model_path", "z"]),
    ("scdm.generate", ["--model_path", "z", "--labels", "x", "--out", "y"]),
])
def test_entry_points_parse_the_same_guidance_limit(module, extra):
    """Parsing refuses what SamplerSettings refuses, in one line naming the flag (no traceback)."""
    r = run_in_process(module, [*extra, "--s", MAX_GUIDANCE + 1])
    assert r.returncode == 2 and "--s" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_sample_batch_is_sample_loop_with_the_settings(run_file):
    loaded = load_checkpoint(run_file)
    diffusion = loaded.diffusion("ddim3")
    y = torch.zeros(2, 4, 16, 16)
    y[:, 1] = 1
    settings = SamplerSettings(sampler="ddim", guidance_scale=1.5, extrapolation=0.8, dynamic_threshold=0.95)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    a = sample_batch(loaded.model, diffusion, y, settings, generators=gens)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    b = sample_loop(loaded.model, diffusion, (2, 3, 16, 16), y, guidance_scale=1.5, extrapolation=0.8,
                    threshold_percentile=0.95, sampler="ddim", generators=gens)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
