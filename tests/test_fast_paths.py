"""Fast paths (issue 7) against the plain computation, and the precision / compile fallbacks."""
import warnings

import pytest
import torch

from conftest import random_label_map
from scdm.performance import fast_paths, maybe_compile, precision_context, set_fast_paths
from scdm.sampling import guided_model_output
from scdm.script_util import create_model_and_diffusion
from scdm.unet import FAST_PATHS, SPADEGroupNorm, clear_spade_caches

RTOL = 1e-4


def _close(a, b, rtol=RTOL, scale=None):
    """Relative to the output's scale: |a - b| <= rtol * max|b| (elementwise relative error is
    meaningless for entries near zero). `scale` overrides max|b| (gradients that are zero in exact
    arithmetic are compared at the scale of the whole model's gradients)."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() if scale is None else scale
    assert err <= rtol * max(scale, 1e-6), f"max abs error {err:.3g} at scale {scale:.3g}"


def _model(tiny_flags, **over):
    flags = dict(tiny_flags, **over)
    model, diffusion = create_model_and_diffusion(**flags)
    # The released init zeroes the output convs (the model would output 0 whatever the paths do):
    # give every zero parameter random values, and make gamma/beta large.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
        for m in model.modules():
            if isinstance(m, SPADEGroupNorm):
                m.mlp_gamma.weight.mul_(5)
                m.mlp_beta.bias.normal_()
    clear_spade_caches(model)
    return model.eval(), diffusion


def _inputs(flags, b=4, null_rows=(), with_edge=True):
    s = flags["image_size"]
    x = torch.randn(b, 3, s, s)
    t = torch.randint(0, 100, (b,))
    y = random_label_map(b, flags["num_classes"], s, s, with_edge=with_edge)
    for i in null_rows:
        y[i] = 0
    return x, t, y


@pytest.mark.parametrize("null_rows", [(), (1,), (0, 2), (0, 1, 2, 3)])
def test_forward_fast_equals_plain(tiny_flags, null_rows):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, null_rows=null_rows)
    with torch.no_grad():
        with fast_paths(False):
            plain = model(x, t, y=y)
        with fast_paths(True):
            fast = model(x, t, y=y)
            cached = model(x, t, y=y)  # second call hits the all-zero-map cache
    _close(fast, plain)
    _close(cached, plain)


def test_each_switch_alone_equals_plain(tiny_flags):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, null_rows=(3,))
    with torch.no_grad(), fast_paths(False):
        plain = model(x, t, y=y)
    for name in FAST_PATHS:
        with torch.no_grad(), fast_paths(False, **{name: True}):
            _close(model(x, t, y=y), plain)


def test_no_instance_and_soft_maps(tiny_flags):
    """Without an edge channel the last class plays its role; a non-one-hot (soft, e.g. Gaussian
    label diffusion) map takes the dense fallback. Both equal the plain path."""
    model, _ = _model(tiny_flags, no_instance=True)
    x, t, y = _inputs(tiny_flags, with_edge=False)
    soft = y * torch.rand_like(y)
    with torch.no_grad():
        for cond in (y, soft):
            with fast_paths(False):
                plain = model(x, t, y=cond)
            with fast_paths(True):
                _close(model(x, t, y=cond), plain)


def test_with_unconditional_equals_two_passes(tiny_flags):
    model, diffusion = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, b=2)
    with torch.no_grad():
        with fast_paths(False):
            cond, uncond = model(x, t, y=y), model(x, t, y=torch.zeros_like(y))
            released = guided_model_output(model, diffusion, x, t, y, guidance_scale=1.5, batched=False)
        with fast_paths(True):
            both = model(x, t, y=y, with_unconditional=True)
            guided = guided_model_output(model, diffusion, x, t, y, guidance_scale=1.5)
    _close(both, torch.cat([cond, uncond]))
    _close(guided, released)


def test_training_gradients_equal(tiny_flags):
    """Loss and every parameter gradient match, including the gather's custom backward and the
    zero (not None) gradient the all-zero rows give to mlp_shared."""
    torch.manual_seed(1)
    model, diffusion = _model(tiny_flags)
    model.train()
    x, t, y = _inputs(tiny_flags, null_rows=(2,))
    noise = torch.randn_like(x)
    label_noise = torch.rand(x.shape[0], 1, *x.shape[2:])
    grads = {}
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        with fast_paths(enabled):
            loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=noise,
                                               label_noise=label_noise)["loss"].mean()
        loss.backward()
        grads[enabled] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None})
    (l0, g0), (l1, g1) = grads[False], grads[True]
    _close(l1, l0)
    assert g0.keys() == g1.keys()
    overall = max(g.abs().max().item() for g in g0.values())
    for name in g0:
        _close(g1[name], g0[name], scale=max(g0[name].abs().max().item(), 1e-2 * overall))


def test_null_cache_invalidated_by_optimizer_step(tiny_flags):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, null_rows=(0, 1, 2, 3))
    with torch.no_grad():
        before = model(x, t, y=y)
        for p in model.parameters():
            p.add_(0.05)  # in-place update, like an optimizer step: bumps the version counters
        after = model(x, t, y=y)
        with fast_paths(False):
            plain = model(x, t, y=y)
    assert (after - before).abs().max() > 1e-3
    _close(after, plain)


def test_fast_paths_context_restores_and_rejects_unknown():
    before = dict(FAST_PATHS)
    with fast_paths(False, sdpa_attention=True):
        assert FAST_PATHS["sdpa_attention"] and not FAST_PATHS["spade_gather"]
    assert FAST_PATHS == before
    with pytest.raises(ValueError, match="unknown fast paths"):
        with fast_paths(True, not_a_switch=True):
            pass
    previous = set_fast_paths(False)
    assert not any(FAST_PATHS.values())
    FAST_PATHS.update(previous)


def test_precision_unavailable_warns_and_runs_fp32(monkeypatch):
    """Asking for a precision the device cannot do: one warning, then fp32."""
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    from scdm import performance
    performance._warned.clear()
    with pytest.warns(RuntimeWarning, match="precision bf16 is not available on cpu"):
        ctx = precision_context("cpu", "bf16")
    with ctx:
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="expected one of"):
        precision_context("cpu", "fp8")


def test_precision_bf16_on_cpu_autocasts():
    with precision_context("cpu", "bf16"):
        out = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert out.dtype == torch.bfloat16


def test_compile_unavailable_falls_back_to_eager(tiny_flags, monkeypatch):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, b=1)
    with torch.no_grad():
        expected = model(x, t, y=y)
    from scdm import performance
    performance._warned.clear()
    monkeypatch.setattr(performance, "_compile_unavailable", lambda m: "no C++ compiler found")
    with pytest.warns(RuntimeWarning, match="torch.compile is not available: no C\\+\\+ compiler"):
        same = maybe_compile(model)
    assert same is model
    with torch.no_grad():
        _close(model(x, t, y=y), expected)


def test_compile_failure_at_first_call_falls_back(tiny_flags, monkeypatch):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, b=1)
    with torch.no_grad():
        expected = model(x, t, y=y)
    from scdm import performance
    performance._warned.clear()

    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("backend compiler failed")
        return run
    monkeypatch.setattr(performance, "_compile_unavailable", lambda m: "")
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = maybe_compile(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model(x, t, y=y)
        out2 = model(x, t, y=y)
    assert any("torch.compile failed (RuntimeError: backend compiler failed)" in str(w.message) for w in caught)
    _close(out, expected)
    _close(out2, expected)
    with pytest.raises(ValueError):  # errors the eager model raises too still propagate
        model(x[:, :, :5], t, y=y)


def test_disable_fast_paths_flag_values():
    from scdm.performance import disable_fast_paths
    before = dict(FAST_PATHS)
    try:
        assert disable_fast_paths("") == [] and FAST_PATHS == before
        assert disable_fast_paths("spade_gather, channels_last") == ["spade_gather", "channels_last"]
        assert not FAST_PATHS["spade_gather"] and not FAST_PATHS["channels_last"] and FAST_PATHS["sdpa_attention"]
        disable_fast_paths("all")
        assert not any(FAST_PATHS.values())
        with pytest.raises(ValueError, match=r"--disable_fast_paths: unknown fast paths \['flash'\]"):
            disable_fast_paths("flash")
    finally:
        FAST_PATHS.update(before)


def test_image_sample_rejects_unknown_fast_path(capsys):
    from scdm import image_sample
    from scdm.cli import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(image_sample.main, ["--dataset_mode", "folder", "--num_classes", "4", "--disable_fast_paths", "nope"])
    assert e.value.code == 2
    assert "unknown fast paths ['nope']" in capsys.readouterr().err
