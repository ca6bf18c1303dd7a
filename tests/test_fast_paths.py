"""The model's exact fast paths against the plain computation, their per-model config, and the
precision / compile fallbacks."""
import copy
import warnings

import pytest
import torch

from conftest import random_label_map
from scdm.fast import performance
from scdm.fast.fast_paths import UNIQUE_PATCH_MAX_RATIO, FastPaths, from_disable_spec, override, unwrap
from scdm.fast.performance import maybe_compile, precision_context, resolve_precision
from scdm.diffusion.sampling import guided_model_output
from scdm.script_util import create_model_and_diffusion
from scdm.fast.fast_spade import clear_spade_caches, gather_sum, rows_of
from scdm.models.spade import SPADEGroupNorm
from scdm.models.unet import AttentionBlock, UNetModel

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


def _configs_of_blocks(model):
    """The configs the blocks hold (the SPADE norms hold none: they get the model's inside SpadeLabels)."""
    assert not any(hasattr(m, "fast_paths") for m in model.modules() if isinstance(m, SPADEGroupNorm))
    return {m.fast_paths for m in model.modules() if isinstance(m, AttentionBlock)}


def test_gather_sum_backward_with_and_without_the_row_index():
    """gather_sum's gradient, by index_add and by the by-row index (embedding_bag), equals that of the
    same sum as a one-hot matrix product; rows nobody picks get zero, repeated picks count twice."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(12, 5, generator=g, dtype=torch.float64)
    index = torch.randint(0, 10, (40, 3), generator=g)  # rows 10 and 11 never picked
    index[0] = torch.tensor([4, 4, 4])
    weight = torch.randn(40, 5, generator=g, dtype=torch.float64)
    picks = torch.nn.functional.one_hot(index, 12).to(table.dtype).sum(1)  # (40, 12)
    expected = picks.t() @ weight
    sources, offsets = rows_of(index, 12)
    counts = torch.bincount(index.flatten(), minlength=12)
    assert torch.equal(offsets, torch.cumsum(counts, 0) - counts)
    for r in range(12):  # row r's bag: exactly the n that pick r, once per pick
        bag = sources[offsets[r]:offsets[r] + counts[r]]
        assert sorted(bag.tolist()) == sorted(n for n in range(40) for j in range(3) if index[n, j] == r)
    for by_row in (None, rows_of(index, 12)):
        t = table.clone().requires_grad_()
        out = gather_sum(t, index, by_row)
        _close(out, picks @ table, rtol=1e-12)
        (out * weight).sum().backward()
        _close(t.grad, expected, rtol=1e-12)
        assert not t.grad[10:].any()


# ----- fast == plain --------------------------------------------------------------------------
@pytest.mark.parametrize("null_rows", [(), (1,), (0, 2), (0, 1, 2, 3)])
def test_forward_fast_equals_plain(tiny_flags, null_rows):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, null_rows=null_rows)
    with torch.no_grad():
        with override(model, False):
            plain = model(x, t, y=y)
        with override(model, True):
            fast = model(x, t, y=y)
            cached = model(x, t, y=y)  # second call hits the all-zero-map cache
    _close(fast, plain)
    _close(cached, plain)


def test_each_switch_alone_equals_plain(tiny_flags):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, null_rows=(3,))
    with torch.no_grad(), override(model, False):
        plain = model(x, t, y=y)
    for name in FastPaths.names():
        with torch.no_grad(), override(model, False, **{name: True}):
            _close(model(x, t, y=y), plain)


def test_no_instance_and_soft_maps(tiny_flags):
    """Without an edge channel the last class plays its role; a non-one-hot (soft, e.g. Gaussian
    label diffusion) map takes the dense fallback. Both equal the plain path."""
    model, _ = _model(tiny_flags, no_instance=True)
    x, t, y = _inputs(tiny_flags, with_edge=False)
    soft = y * torch.rand_like(y)
    with torch.no_grad():
        for cond in (y, soft):
            with override(model, False):
                plain = model(x, t, y=cond)
            with override(model, True):
                _close(model(x, t, y=cond), plain)


@pytest.mark.parametrize("shared_encoder", [True, False])
def test_forward_with_cfg_equals_two_passes(tiny_flags, shared_encoder):
    model, diffusion = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, b=2)
    with torch.no_grad():
        with override(model, False):
            cond, uncond = model(x, t, y=y), model(x, t, y=torch.zeros_like(y))
            released = guided_model_output(model, diffusion, x, t, y, guidance_scale=1.5, batched=False)
        with override(model, True, shared_encoder=shared_encoder):
            both = model.forward_with_cfg(x, t, y)
            same = model(x, t, y=y, with_unconditional=True)
            guided = guided_model_output(model, diffusion, x, t, y, guidance_scale=1.5)
    assert both.shape[0] == 2 * x.shape[0]
    _close(both, torch.cat([cond, uncond]))
    _close(same, both)
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
        with override(model, enabled):
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
        with override(model, False):
            plain = model(x, t, y=y)
    assert (after - before).abs().max() > 1e-3
    _close(after, plain)


# ----- the per-model config -------------------------------------------------------------------
def test_fast_paths_config():
    assert FastPaths() == FastPaths.all_on() and all(getattr(FastPaths(), n) for n in FastPaths.names())
    assert not any(getattr(FastPaths.all_off(), n) for n in FastPaths.names())
    assert set(FastPaths.names()) == {"sdpa_attention", "spade_gather", "spade_unique_patches", "fused_gamma_beta",
                                      "null_label_cache", "shared_encoder", "channels_last", "fused_adamw"}
    one = FastPaths.all_off().replace(null_label_cache=True)
    assert one.spade_enabled and not FastPaths.all_off().replace(sdpa_attention=True).spade_enabled
    with pytest.raises(ValueError, match=r"unknown fast paths \['flash'\]; known: \["):
        FastPaths().replace(flash=False)
    with pytest.raises(Exception):  # frozen
        FastPaths().sdpa_attention = False
    assert 0 < UNIQUE_PATCH_MAX_RATIO <= 1


def test_from_disable_spec_values_and_errors():
    assert from_disable_spec("") == FastPaths() and from_disable_spec(None) == FastPaths()
    config = from_disable_spec("spade_gather, channels_last")
    assert config == FastPaths().replace(spade_gather=False, channels_last=False)
    assert config.disabled() == ["spade_gather", "channels_last"]
    assert from_disable_spec("all") == FastPaths.all_off()
    with pytest.raises(ValueError, match=r"^--disable_fast_paths: unknown fast paths \['flash'\]"):
        from_disable_spec("flash")
    with pytest.raises(ValueError, match=r"unknown fast paths \['all'\]"):  # "all" only on its own
        from_disable_spec("all,sdpa_attention")


def test_config_reaches_every_block_and_models_are_independent(tiny_flags):
    a, _ = _model(tiny_flags)
    b = copy.deepcopy(a)
    a.fast_paths = FastPaths.all_off()
    assert _configs_of_blocks(a) == {FastPaths.all_off()} and a.fast_paths == FastPaths.all_off()
    assert _configs_of_blocks(b) == {FastPaths()} and b.fast_paths == FastPaths()
    x, t, y = _inputs(tiny_flags, null_rows=(1,))
    with torch.no_grad():
        _close(b(x, t, y=y), a(x, t, y=y))
    with pytest.raises(TypeError, match="must be a FastPaths"):
        a.fast_paths = {"sdpa_attention": False}
    built = UNetModel(16, 3, 32, 3, 1, (), channel_mult=(1, 2), num_classes=5, fast_paths=FastPaths.all_off())
    assert built.fast_paths == FastPaths.all_off() and _configs_of_blocks(built) == {FastPaths.all_off()}


def test_override_restores_also_after_an_exception(tiny_flags):
    model, _ = _model(tiny_flags)
    start = FastPaths().replace(channels_last=False)
    model.fast_paths = start
    with override(model, False, sdpa_attention=True) as config:
        assert model.fast_paths == config == FastPaths.all_off().replace(sdpa_attention=True)
        assert _configs_of_blocks(model) == {config}
    assert model.fast_paths == start and _configs_of_blocks(model) == {start}
    with override(model, None, shared_encoder=False):  # None: the current config, then the names
        assert model.fast_paths == start.replace(shared_encoder=False)
    with pytest.raises(RuntimeError, match="boom"):
        with override(model, False):
            raise RuntimeError("boom")
    assert model.fast_paths == start and _configs_of_blocks(model) == {start}
    with pytest.raises(ValueError, match="unknown fast paths"):
        with override(model, True, not_a_switch=True):
            pass
    assert model.fast_paths == start


def test_override_finds_the_model_through_wrappers(tiny_flags):
    model, diffusion = _model(tiny_flags)

    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    class CompiledLike(torch.nn.Module):
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

        def forward(self, *args, **kwargs):
            return self._orig_mod(*args, **kwargs)

    wrapped = CompiledLike(DDPLike(model))
    assert unwrap(wrapped) is model
    with override(wrapped, False):
        assert model.fast_paths == FastPaths.all_off()
    assert model.fast_paths == FastPaths()
    with pytest.raises(TypeError, match="no fast-path config"):
        unwrap(torch.nn.Linear(2, 2))
    x, t, y = _inputs(tiny_flags, b=2)
    with torch.no_grad():
        _close(guided_model_output(wrapped, diffusion, x, t, y, guidance_scale=1.5),
               guided_model_output(model, diffusion, x, t, y, guidance_scale=1.5, batched=False))


# ----- precision and compile ------------------------------------------------------------------
def test_resolve_precision():
    assert resolve_precision("", False) == "fp32"
    assert resolve_precision("", True) == "fp16"
    assert resolve_precision("bf16", False) == "bf16"
    assert resolve_precision("fp16", True) == "fp16"
    with pytest.raises(ValueError, match=r"--precision 'fp8': expected one of \('auto', 'fp32', 'fp16', 'bf16'\)"):
        resolve_precision("fp8", False)
    with pytest.raises(ValueError, match="--use_fp16 True contradicts --precision bf16"):
        resolve_precision("bf16", True)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_fits_the_device(monkeypatch, native):
    """auto: fp16 on a GPU for a --use_fp16 True model, bf16 on a CPU with native bf16 (sampling only),
    fp32 elsewhere; the reason names what decided it."""
    flags = {"avx2", "avx512f"} | ({"avx512_bf16"} if native else set())
    monkeypatch.setattr(performance, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", False, cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", True, cpu) == ("bf16" if native else "fp32")  # no fp16 on a CPU by itself
    precision, why = performance.auto_precision(cpu, False)
    assert why == ("this CPU has avx512_bf16" if native else
                   f"this CPU ({performance.cpu_model()}) has no avx512_bf16 or amx_bf16: bf16 would be emulated, "
                   "slower than fp32")
    assert performance.auto_precision(cpu, False, training=True) == (
        "fp32", "training on a CPU stays in fp32 unless --precision bf16 asks")
    cuda = torch.device("cuda")  # only the device type is read: no GPU needed
    assert performance.auto_precision(cuda, True)[0] == "fp16"
    assert performance.auto_precision(cuda, False)[0] == "fp32"
    assert resolve_precision("auto", True, cuda, training=True) == "fp16"  # the released fp16 training
    # an explicit choice is never rewritten, and the empty value keeps the released meaning
    assert resolve_precision("fp32", False, cpu) == "fp32" and resolve_precision("", True, cpu) == "fp16"


def test_precision_unavailable_warns_and_runs_fp32(monkeypatch):
    """Asking for a precision the device cannot do: one warning, then fp32."""
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    performance.reset_warnings()
    with pytest.warns(RuntimeWarning, match="precision bf16 is not available on cpu"):
        ctx = precision_context("cpu", "bf16")
    with ctx:
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="expected one of"):
        precision_context("cpu", "fp8")


def test_sampling_holds_the_torso_in_half_precision_and_gives_the_fp32_weights_back(tiny_flags, monkeypatch):
    """Sampling in bf16 on a CPU: the torso's convolutions hold bf16 copies (kept while the weights do not
    change) instead of autocasting every call; norms, embeddings and the output layer stay fp32; the fp32
    weights come back bit for bit after the block, also after an error. Training (gradients) and compiled
    models keep autocast."""
    monkeypatch.setattr(performance, "cpu_half_support", lambda p: (True, "has them"))
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, b=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model.input_blocks[1][0].in_layers[2]
    with torch.no_grad():
        reference = model(x, t, y)
        with precision_context("cpu", "bf16", model=model):
            assert not torch.is_autocast_enabled("cpu")
            assert model.dtype == torch.bfloat16 and conv.weight.dtype == torch.bfloat16
            assert model.time_embed[0].weight.dtype == torch.float32 and model.out[2].weight.dtype == torch.float32
            held = conv.weight.data_ptr()
            out = model(x, t, y)
        with precision_context("cpu", "bf16", model=model):
            assert conv.weight.data_ptr() == held  # the copy is kept
        conv.weight.add_(1.0)  # a changed weight (a training step, EMA loading) is copied again
        with precision_context("cpu", "bf16", model=model):
            assert conv.weight.data_ptr() != held
            assert torch.equal(conv.weight.float(), (before[_key(model, conv)] + 1).bfloat16().float())
        conv.weight.sub_(1.0)
        with pytest.raises(ZeroDivisionError):
            with precision_context("cpu", "bf16", model=model):
                1 / 0
    assert out.dtype == torch.float32 and not torch.equal(out, reference)  # bf16 really ran ...
    _close(out, reference, rtol=0.05)  # ... and changed the output by rounding only
    assert model.dtype == torch.float32
    after = model.state_dict()
    untouched = [k for k in before if "input_blocks.1.0.in" not in k]
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in untouched)
    with precision_context("cpu", "bf16", model=model):  # gradients on: autocast, the weights untouched
        assert torch.is_autocast_enabled("cpu") and conv.weight.dtype == torch.float32
    model.compiled_forward = True
    with torch.no_grad(), precision_context("cpu", "bf16", model=model):
        assert torch.is_autocast_enabled("cpu") and conv.weight.dtype == torch.float32


def _key(model, module):
    return next(f"{name}.weight" for name, m in model.named_modules() if m is module)


def test_bf16_norms_and_softmax_skip_the_upcast_with_the_same_values():
    """bf16 goes to the group norm and softmax kernels directly (they compute in fp32 and round once):
    within one bf16 rounding step of the released upcast-and-cast-back."""
    from scdm.models.nn import GroupNorm32
    from scdm.models.unet import qkv_attention
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 8, 8, generator=g) * 3 + 1).bfloat16()
    norm = GroupNorm32(32, 64)
    ulp = 2.0 ** -7  # bf16 keeps 8 significant bits: one step is at most 2^-7 relative
    released = torch.nn.GroupNorm.forward(norm, x.float()).bfloat16()
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - released.float()).abs() <= ulp * released.float().abs() + 1e-30).all()
    qkv = (torch.randn(2, 3 * 2 * 16, 40, generator=g) * 2).bfloat16()
    got = qkv_attention(qkv, num_heads=2, use_sdpa=False)
    q, k, v = qkv.reshape(4, 48, 40).split(16, dim=1)
    scale = 16 ** -0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1).bfloat16()
    released = torch.einsum("bts,bcs->bct", w, v).reshape(2, -1, 40)
    assert got.dtype == torch.bfloat16
    _close(got.float(), released.float(), rtol=2 * ulp)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_on_cpu_only_where_native(monkeypatch, precision, dtype):
    """A CPU with the instructions autocasts; one without says why in one warning and runs fp32."""
    monkeypatch.setattr(performance, "cpu_half_support", lambda p: (True, "has them"))
    with precision_context("cpu", precision):
        out = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert out.dtype == dtype
    monkeypatch.undo()
    flags = {"fpu", "avx2", "avx512f"}
    monkeypatch.setattr(performance, "cpu_flags", lambda: flags)
    performance.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = precision_context("cpu", precision)
        precision_context("cpu", precision)  # once per process
    assert [str(w.message) for w in caught] == [
        f"precision {precision} is not available on cpu (this CPU ({performance.describe_machine()['cpu']}) has no "
        f"{' or '.join(performance.CPU_HALF_FLAGS[precision])}: {precision} would be emulated, slower than fp32); "
        "running in fp32"]
    with ctx:
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.float32


def test_cpu_half_support_reads_the_flags():
    assert performance.cpu_half_support("bf16", {"avx2", "amx_bf16"}) == (True, "this CPU has amx_bf16")
    assert performance.cpu_half_support("bf16", {"avx512_bf16", "avx512_fp16"})[0]
    assert not performance.cpu_half_support("bf16", {"avx512f", "avx512_fp16"})[0]
    assert performance.cpu_half_support("fp16", {"avx512_fp16"}) == (True, "this CPU has avx512_fp16")
    assert not performance.cpu_half_support("fp16", {"avx512_bf16"})[0]


def test_compile_unavailable_falls_back_to_eager(tiny_flags, monkeypatch):
    model, _ = _model(tiny_flags)
    x, t, y = _inputs(tiny_flags, b=1)
    with torch.no_grad():
        expected = model(x, t, y=y)
    performance.reset_warnings()
    monkeypatch.setattr(performance, "compile_unavailable_reason", lambda m: "no C++ compiler found")
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
        expected_cfg = model.forward_with_cfg(x, t, y)
    performance.reset_warnings()

    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("backend compiler failed")
        return run
    monkeypatch.setattr(performance, "compile_unavailable_reason", lambda m: "")
    monkeypatch.setattr(torch, "compile", broken_compile)
    own = model.fast_paths
    model = maybe_compile(model)
    assert model.fast_paths == own.for_compile()  # what the compiler traces
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model(x, t, y=y)
        out2 = model(x, t, y=y)
        cfg = model.forward_with_cfg(x, t, y)
    assert any("torch.compile failed (RuntimeError: backend compiler failed)" in str(w.message) for w in caught)
    assert model.fast_paths == own  # the eager fallback runs its own fast paths again
    _close(out, expected)
    _close(out2, expected)
    _close(cfg, expected_cfg)
    with pytest.raises(ValueError):  # errors the eager model raises too still propagate
        model(x[:, :, :5], t, y=y)


def test_image_sample_rejects_unknown_fast_path(capsys):
    from scdm import image_sample
    from scdm.runtime.errors import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(image_sample.main, ["--dataset_mode", "folder", "--num_classes", "4", "--disable_fast_paths", "nope"])
    assert e.value.code == 2
    assert "unknown fast paths ['nope']" in capsys.readouterr().err


def test_the_compiled_config_traces_in_one_graph(tiny_flags):
    """FastPaths.for_compile(): dynamo captures the whole forward, plain and guided, with no graph break
    (each break would be a Python decision or a timing inside the trace), and computes what the eager
    default computes."""
    import torch._dynamo
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_flags)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.eval()
    x, t, y = _inputs(tiny_flags, b=2)
    with torch.no_grad():
        expected = model(x, t, y=y)
        model.fast_paths = FastPaths().for_compile()
        plain = torch._dynamo.explain(model.forward)(x, t, y=y)
        guided = torch._dynamo.explain(
            lambda x, t, y: guided_model_output(model, diffusion, x, t, y, guidance_scale=1.5))(x, t, y)
        _close(model(x, t, y=y), expected)
    torch._dynamo.reset()
    assert (plain.graph_count, plain.graph_break_count) == (1, 0), plain.break_reasons
    assert (guided.graph_count, guided.graph_break_count) == (1, 0), guided.break_reasons
    off = FastPaths().for_compile()
    assert not (off.spade_gather or off.spade_unique_patches or off.null_label_cache or off.fused_gamma_beta)
    assert off.sdpa_attention is True and off.channels_last is False
    assert FastPaths(sdpa_attention=False, channels_last=True).for_compile().sdpa_attention is False
    assert FastPaths(channels_last=True).for_compile().channels_last is True
