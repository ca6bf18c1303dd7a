"""The "auto" fast paths: the autotuner's decision logic with a scripted clock, forcing each branch,
and the model under every branch against the plain computation."""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_label_map
from scdm.fast.fast_paths import AUTO, Autotuner, FastPaths, apply_settings, override
from scdm.script_util import create_model_and_diffusion
from scdm.fast import fast_spade
from scdm.fast.fast_spade import SpadeLabels, cond_strategies


class ScriptedClock:
    """Each timed run of candidate c of choice `name` lasts costs[(name, c)] seconds (default 1)."""

    def __init__(self, costs):
        self.costs, self.now, self.tuner, self.calls = costs, 0.0, None, 0

    def __call__(self):
        self.calls += 1
        now = self.now
        if self.tuner is not None and self.tuner.current is not None:
            self.now += self.costs.get(self.tuner.current, 1.0)  # so that end - start = the cost
        return now


def _tuner(costs):
    clock, lines = ScriptedClock(costs), []
    tuner = Autotuner(clock=clock, repeats=2, log=lines.append)
    clock.tuner = tuner
    return tuner, clock, lines


def test_autotuner_picks_the_fastest_once_and_logs_once():
    tuner, clock, lines = _tuner({("op", "a"): 3.0, ("op", "b"): 1.0, ("op", "c"): 2.0})
    runs = {"a": 0, "b": 0, "c": 0}
    candidates = {k: (lambda k=k: runs.__setitem__(k, runs[k] + 1)) for k in runs}
    assert tuner.choose("op", ("cpu", 4), candidates) == "b"
    assert runs == {"a": 3, "b": 3, "c": 3}  # one warm-up and two timed runs each
    assert tuner.timings[("op", "cpu", 4)] == {"a": 3.0, "b": 1.0, "c": 2.0}
    assert lines == ["fast paths: op cpu 4: using b (b 1000.0 ms, c 2000.0 ms, a 3000.0 ms)"]
    calls = clock.calls
    assert tuner.choose("op", ("cpu", 4), candidates) == "b"  # cached: nothing runs, nothing logged
    assert runs == {"a": 3, "b": 3, "c": 3} and clock.calls == calls and len(lines) == 1
    assert tuner.choose("op", ("cpu", 8), candidates) == "b" and len(lines) == 2  # a new key is timed
    assert tuner.choose("op", ("cpu", 16), {"a": candidates["a"]}) == "a"  # one candidate: nothing to time
    assert runs["a"] == 6 and len(lines) == 2


def test_autotuner_leaves_random_streams_alone():
    tuner, _, _ = _tuner({("op", "x"): 2.0})
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tuner.choose("op", (), {"x": lambda: torch.rand(100), "y": lambda: torch.rand(100)})
    assert torch.equal(torch.rand(3), expected)


def test_switch_values_and_settings_spec():
    assert FastPaths().automatic() == ["sdpa_attention", "spade_gather", "spade_unique_patches", "channels_last"]
    with pytest.raises(ValueError, match=r"fast path spade_gather='fast': expected True, False or 'auto'"):
        FastPaths(spade_gather="fast")
    assert FastPaths.all_off().replace(channels_last=AUTO).channels_last == AUTO
    config = apply_settings(FastPaths(), "channels_last=off, spade_unique_patches=on,sdpa_attention=auto")
    assert (config.channels_last, config.spade_unique_patches, config.sdpa_attention) == (False, True, AUTO)
    with pytest.raises(ValueError, match=r"^--fast_paths: 'channels_last' is not name=on, name=off or name=auto"):
        apply_settings(FastPaths(), "channels_last")
    with pytest.raises(ValueError, match=r"^--fast_paths: unknown fast path 'flash'"):
        apply_settings(FastPaths(), "flash=on")


@pytest.mark.parametrize("gather, unique, expected", [
    (AUTO, AUTO, ["unique", "gather", "conv"]), (True, AUTO, ["unique", "gather"]), (AUTO, False, ["gather", "conv"]),
    (True, True, ["unique"]), (True, False, ["gather"]), (False, AUTO, ["conv"]), (False, True, ["conv"]),
])
def test_forced_switches_leave_only_their_branch(tiny_flags, gather, unique, expected):
    y = random_label_map(2, tiny_flags["num_classes"], 8, 8)
    labels = SpadeLabels(y, torch.float32, FastPaths(spade_gather=gather, spade_unique_patches=unique))
    assert cond_strategies(labels) == expected
    soft = SpadeLabels(y * 0.5, torch.float32, FastPaths(spade_gather=gather, spade_unique_patches=unique))
    assert cond_strategies(soft) == ["conv"]  # not one-hot: the convs are the only exact path


def _model(tiny_flags):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**dict(tiny_flags, attention_resolutions="8,4"))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model, diffusion


def _close(a, b, rtol=1e-4, scale=None):
    scale = b.abs().max().item() if scale is None else scale
    assert (a - b).abs().max().item() <= rtol * max(scale, 1e-6)


@pytest.mark.parametrize("winners", [("unique", "nhwc", "sdpa"), ("conv", "nchw", "einsum"),
                                     ("gather", "nhwc", "einsum")])
@pytest.mark.parametrize("training", [False, True])
def test_model_under_every_choice_equals_plain(tiny_flags, winners, training):
    """Scripted timings make each branch win in turn; the model then runs that branch (recorded)
    and its output (and gradients) equal the plain path's."""
    model, diffusion = _model(tiny_flags)
    spade, layout, attention = winners
    tuner, _, lines = _tuner({("spade", spade): 0.1, ("channels_last", layout): 0.1,
                              ("sdpa_attention", attention): 0.1})
    model.autotuner = tuner
    s = tiny_flags["image_size"]
    x, t = torch.randn(3, 3, s, s), torch.tensor([5, 50, 90])
    # Blocky maps: few distinct 3x3 patches, so that the unique-patch plan is really used.
    y = F.interpolate(random_label_map(3, tiny_flags["num_classes"], 4, 4), size=(s, s), mode="nearest")
    y[2] = 0
    used = []
    original = fast_spade.cond_scale_shift_by

    def spy(norm, strategy, labels, size, fresh=False):
        if not fresh and tuner.current is None:  # the real forward, not a timing run
            used.append((strategy, labels.fast_paths.channels_last))
        return original(norm, strategy, labels, size, fresh)

    def run(enabled):
        model.zero_grad(set_to_none=True)
        with override(model, enabled), torch.set_grad_enabled(training):
            out = model(x, t, y=y)
            if training:
                out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None] if training else []
        return out.detach(), grads

    plain, plain_grads = run(False)
    fast_spade.cond_scale_shift_by = spy
    try:
        fast, fast_grads = run(True)
    finally:
        fast_spade.cond_scale_shift_by = original
    _close(fast, plain)
    if training:
        overall = max(g.abs().max().item() for g in plain_grads)
        assert len(fast_grads) == len(plain_grads)
        for a, b in zip(fast_grads, plain_grads):
            _close(a, b, scale=max(b.abs().max().item(), 1e-2 * overall))
    choices = {key[0]: [] for key in tuner.choices}
    for key, choice in tuner.choices.items():
        choices[key[0]].append(choice)
    assert choices["channels_last"] == [layout]
    assert set(choices["sdpa_attention"]) == {attention}
    spade_keys = [k for k in tuner.choices if k[0] == "spade"]
    assert spade_keys and all(tuner.choices[k] == spade for k in spade_keys if k[-1] == layout)
    # The real forward ran the winning SPADE path, in the winning layout.
    assert used and set(used) == {(spade, layout == "nhwc")}
    assert len(lines) == len(tuner.choices)
    # A second call times nothing more.
    before = dict(tuner.choices)
    with torch.no_grad() if not training else torch.enable_grad():
        model(x, t, y=y)
    assert tuner.choices == before and len(lines) == len(before)


def test_spade_choices_are_shared_by_labelled_row_counts_up_to_a_power_of_two(tiny_flags):
    """Classifier-free dropout changes how many rows carry labels from batch to batch: 3 and 4 labelled
    rows share one SPADE timing per norm shape, 5 is timed anew."""
    model, _ = _model(tiny_flags)
    tuner, _, lines = _tuner({})
    model.autotuner = tuner
    model.fast_paths = model.fast_paths.replace(channels_last=False, sdpa_attention=False)
    s = tiny_flags["image_size"]

    def spade_keys(rows, dropped):
        y = random_label_map(rows, tiny_flags["num_classes"], s, s)
        y[rows - dropped:] = 0
        with torch.no_grad():
            model(torch.randn(rows, 3, s, s), torch.randint(0, 100, (rows,)), y=y)
        return sorted(k for k in tuner.choices if k[0] == "spade")

    three = spade_keys(4, dropped=1)
    assert three and all("<=4x" in k[4] for k in three)
    assert spade_keys(4, dropped=0) == three and spade_keys(5, dropped=1) == three  # 4 labelled rows each
    five = spade_keys(6, dropped=1)
    assert len(five) == 2 * len(three) and len(lines) == len(five)


def test_choices_go_to_the_routed_sinks_and_the_console_gets_one_summary():
    from scdm.fast import fast_paths
    lines = []
    clock = ScriptedClock({("op", "a"): 3.0, ("op", "b"): 1.0, ("sdpa", "x"): 2.0, ("sdpa", "y"): 5.0})
    tuner = Autotuner(clock=clock, repeats=1)
    clock.tuner = tuner
    fast_paths.route_details(lines.append)
    try:
        for key in (1, 2, 3):
            tuner.choose("op", ("cpu", key), {"a": lambda: None, "b": lambda: None})
        tuner.choose("sdpa", ("cpu",), {"x": lambda: None, "y": lambda: None})
    finally:
        fast_paths.route_details()
    assert len(lines) == 4 and all(line.startswith("fast paths: ") for line in lines)
    summary = fast_paths.summary_line(tuner)
    assert summary.startswith("fast paths: 4 choice(s) timed in ") and summary.endswith("(op b 3; sdpa x 1)")
    assert fast_paths.summary_line(Autotuner()) is None
