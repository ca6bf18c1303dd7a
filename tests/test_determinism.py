"""Same seed, same bits: batch-invariant sampling, and the fast-path choices shared through the
machine's tuning cache and a results folder's record."""
import json

import pytest
import torch

from scdm.fast import fast_paths, tuning_cache
from scdm.fast.fast_paths import Autotuner
from scdm.diffusion.sampling import sample_loop
from scdm.script_util import create_model_and_diffusion
from scdm.fast.tuning_cache import TuningCache, machine_key, reuse_record, write_record

from conftest import random_label_map


@pytest.fixture(scope="module")
def busy_model():
    """A tiny SPADE UNet with every weight perturbed (a fresh one predicts zero: its output conv is zero)."""
    torch.manual_seed(3)
    model, diffusion = create_model_and_diffusion(
        image_size=16, num_classes=4, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
        num_head_channels=16, learn_sigma=True, no_instance=False, resblock_updown=True, use_scale_shift_norm=True,
        diffusion_steps=100, noise_schedule="linear", timestep_respacing="ddim4", cond_diffuse=True,
        cond_opt="discrete_zero_uniform")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.autotuner = Autotuner()  # timed here, not shared with the other tests
    return model.eval(), diffusion


def sample(model, diffusion, y, seeds, batch_invariant):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return sample_loop(model, diffusion, (len(seeds), 3, 16, 16), y, guidance_scale=1.5, extrapolation=0.8,
                       threshold_percentile=0.95, sampler="ddim", generators=gens, batch_invariant=batch_invariant)


def test_batch_invariant_sampling_gives_the_same_bits_in_any_batch(busy_model):
    model, diffusion = busy_model
    y = random_label_map(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    seeds = [11, 12, 13]
    together = sample(model, diffusion, y, seeds, True)
    alone = torch.cat([sample(model, diffusion, y[i:i + 1], seeds[i:i + 1], True) for i in range(3)])
    order = [2, 0, 1]
    shuffled = sample(model, diffusion, y[order], [seeds[i] for i in order], True)
    assert torch.equal(together, alone)
    assert torch.equal(shuffled, together[order])
    # The batched path computes the same function (up to kernel rounding), so the test compares like with like.
    batched = sample(model, diffusion, y, seeds, False)
    assert (batched - together).abs().max() < 1e-3
    assert together.std() > 0.1  # real images, not the zero prediction of an untrained model


def scripted_autotuner(cache, fastest):
    """An autotuner whose clock makes `fastest` win; counts the candidates it ran."""
    runs = []
    tuner = None

    def clock():
        return {fastest: 0.0}.get(tuner.current[1], 1.0) * len(runs)

    tuner = Autotuner(clock=clock, log=lambda line: None, cache=cache)
    return tuner, runs


def candidates(runs):
    return {name: (lambda n=name: runs.append(n)) for name in ("a", "b")}


def test_a_second_process_reuses_the_first_ones_choice(tmp_path):
    cache = TuningCache(tmp_path / "cache.json")
    first, first_runs = scripted_autotuner(cache, "b")
    assert first.choose("op", ("cpu", "4x4"), candidates(first_runs)) == "b"
    assert first_runs  # it timed
    stored = json.loads((tmp_path / "cache.json").read_text())
    assert stored["machines"][machine_key()]["op cpu 4x4"]["choice"] == "b"

    second, second_runs = scripted_autotuner(TuningCache(tmp_path / "cache.json"), "a")  # "a" would win its timing
    assert second.choose("op", ("cpu", "4x4"), candidates(second_runs)) == "b"
    assert second_runs == [] and len(second.reused) == 1  # nothing timed
    assert "reused from this machine's tuning cache" in fast_paths.summary_line(second)
    # another key is timed and added beside the first
    assert second.choose("op", ("cpu", "8x8"), candidates(second_runs)) == "a"
    entries = json.loads((tmp_path / "cache.json").read_text())["machines"][machine_key()]
    assert {k: v["choice"] for k, v in entries.items()} == {"op cpu 4x4": "b", "op cpu 8x8": "a"}


def test_a_corrupt_or_unwritable_cache_only_costs_a_timing(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    tuner, runs = scripted_autotuner(TuningCache(path), "a")
    assert tuner.choose("op", ("k",), candidates(runs)) == "a" and runs
    assert json.loads(path.read_text())["format"] == tuning_cache.FORMAT  # rewritten whole
    blocked = tmp_path / "file"
    blocked.write_text("")
    tuner, runs = scripted_autotuner(TuningCache(blocked / "sub" / "cache.json"), "b")
    assert tuner.choose("op", ("k",), candidates(runs)) == "b"  # under a regular file: no cache, no error
    folder = tmp_path / "a_folder.json"
    folder.mkdir()  # the file itself cannot be replaced (as on a read-only file system): no error either
    for fastest in ("a", "b"):  # nothing is kept: each new tuner times again
        tuner, runs = scripted_autotuner(TuningCache(folder), fastest)
        assert tuner.choose("op", ("k",), candidates(runs)) == fastest and runs and folder.is_dir()


def test_the_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV, "off")
    assert tuning_cache.default_path() is None and tuning_cache.default_cache() is None
    monkeypatch.setenv(tuning_cache.ENV, str(tmp_path / "c.json"))
    assert tuning_cache.default_path() == tmp_path / "c.json"
    monkeypatch.delenv(tuning_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning_cache.default_path() == tmp_path / "xdg" / "scdm" / "fast_paths.json"


def test_machine_key_names_torch_and_the_thread_count():
    threads = torch.get_num_threads()
    key = machine_key("cpu")
    assert torch.__version__ in key and f"threads {threads}" in key
    try:
        torch.set_num_threads(threads + 1)
        assert machine_key("cpu") != key  # another thread count may pick other kernels
    finally:
        torch.set_num_threads(threads)


def test_a_results_folder_record_is_reused_on_this_machine_only(tmp_path):
    first, runs = scripted_autotuner(None, "b")
    first.choose("op", ("cpu", "4x4"), candidates(runs))
    write_record(tmp_path, first)
    second, runs = scripted_autotuner(None, "a")
    assert reuse_record(tmp_path, second) == 1
    assert second.choose("op", ("cpu", "4x4"), candidates(runs)) == "b" and runs == []
    record = json.loads((tmp_path / tuning_cache.RECORD).read_text())
    record["machine"] = "another machine"
    (tmp_path / tuning_cache.RECORD).write_text(json.dumps(record))
    third, runs = scripted_autotuner(None, "a")
    assert reuse_record(tmp_path, third) == 0
    assert third.choose("op", ("cpu", "4x4"), candidates(runs)) == "a"
