"""benchmarks/bench_model.py end to end on its smoke configuration: every measurement it reports runs,
and the fast paths it times agree with the released computation (fp32) or with fp32 by rounding (bf16)."""
import importlib.util
import json
from pathlib import Path

from scdm.fast import performance


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_cpu_part_runs_every_measurement_and_checks_the_fast_paths(capsys):
    """The fp32 CPU part on its smoke configuration: plain and fast guided and training steps, the peaks."""
    _bench().main(["--smoke", "--cpu_parts", "guided,train", "--threads", "1", "--half", ""])
    result = json.loads(capsys.readouterr().out)
    assert result["machine"]["cpu"] == performance.describe_machine()["cpu"]
    cpu = result["cpu"]
    assert cpu["config"]["precisions"] == ["fp32"]
    assert {"matmul_fp32_gflops", "conv3x3_fp32_gflops"} <= set(cpu["peaks"]) and all(
        v > 0 for v in cpu["peaks"].values())
    step = cpu["guided_reverse_step"]["per_step"][0]
    assert step["plain"]["best_s"] > 0 and step["fast"]["best_s"] > 0
    assert step["max_rel_diff"]["pred_xstart"] < 1e-4  # the fp32 fast path is the released computation
    train = cpu["training_step"]
    assert train["plain"]["best_s"] > 0 and train["fast"]["best_s"] > 0
    assert train["max_rel_diff"]["grads_vs_largest_grad"] < 1e-4


def test_bf16_is_timed_holding_half_weights_and_under_autocast(monkeypatch):
    """With bf16 taken as native (so that any CPU runs the code path; emulated it is only slower), the
    guided step is timed fast in bf16 both ways and differs from fp32 by rounding only; training too."""
    monkeypatch.setattr(performance, "cpu_half_support", lambda p: (p == "bf16", "taken as native"))
    bench = _bench()
    flags = dict(bench.cpu_flags(smoke=True), image_size=16, attention_resolutions="8")
    guided = bench.cpu_guided_step(flags, batch=1, steps=[12], warmup=0, repeats=1, half=["bf16"])
    step = guided["per_step"][0]
    for key in ("plain", "fast", "fast_bf16", "fast_bf16_autocast"):
        assert step[key]["best_s"] > 0, key
    assert 0 < step["bf16_max_abs_diff_pred_xstart"] < 0.2  # bf16 ran, and differs by rounding only
    assert guided["bf16_over_fp32_fast_over_steps"] > 0 and guided["bf16_over_plain_over_steps"] > 0
    train = bench.cpu_train_step(flags, batch=2, warmup=0, repeats=1, half=["bf16"])
    assert train["fast_bf16"]["best_s"] > 0 and train["bf16_over_plain_best"] > 0


def _bench_sample():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sample.py"
    spec = importlib.util.spec_from_file_location("bench_sample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sample_names_a_wrong_setting_and_a_wrong_released_checkout(tmp_path, monkeypatch):
    """bench_sample.py refuses an unknown --settings key and a REF_DIR without the released package, by name."""
    import pytest
    from scdm.runtime.errors import UserError
    bench = _bench_sample()
    with pytest.raises(UserError, match="--settings: unknown nope; expected some of released, ours25"):
        bench.main(["--smoke", "--threads", "1", "--settings", "released,nope"])
    monkeypatch.setenv("REF_DIR", str(tmp_path))
    with pytest.raises(UserError, match=f"REF_DIR={tmp_path}: expected a released SCDM checkout with "
                                        "guided_diffusion/script_util.py"):
        bench.main(["--smoke", "--threads", "1", "--settings", "released"])


def test_choices_from_the_tuning_cache_are_reported_without_timings():
    """A second run on the same machine takes its choices from the cache: nothing was timed this time."""
    from types import SimpleNamespace
    tuner = SimpleNamespace(choices={("conv", "4x4"): "gather", ("attn", "8"): "sdpa"},
                            timings={("conv", "4x4"): {"gather": 0.001, "conv": 0.002}})
    choices = _bench().auto_choices(SimpleNamespace(autotuner=tuner))
    assert choices == {"conv 4x4": {"choice": "gather", "ms": {"gather": 1.0, "conv": 2.0}},
                       "attn 8": {"choice": "sdpa", "ms": "from the tuning cache"}}
