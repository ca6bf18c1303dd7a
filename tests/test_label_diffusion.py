"""q_sample_label against hand-computed keep probabilities, and the noise it takes."""
import numpy as np
import pytest
import torch

from scdm.diffusion.label_diffusion import LabelNoise, load_class_schedule
from scdm.script_util import create_gaussian_diffusion, create_model_and_diffusion

from conftest import random_label_map


def onehot(ids, num_classes):
    return torch.nn.functional.one_hot(ids, num_classes).permute(0, 3, 1, 2).float()


def hand_gamma_classwise(lam, t_orig, T=1000):
    """Independent numpy version of gamma_c(tau) (lambda <= 1: uniform)."""
    tau = t_orig / T
    if lam <= 1:
        return 1 - tau
    return 1 - min(tau, (lam ** tau - 1) / (lam - 1 + 1e-7))


@pytest.fixture
def schedule_file(tmp_path):
    lam = np.array([0.3, 5.0, 200.0, 4000.0, 0.0], dtype=np.float64)  # class 4 = unlabeled
    path = tmp_path / "lambda.npy"
    np.save(path, lam)
    return path, lam


def test_uniform_exact_for_fixed_noise():
    diff = create_gaussian_diffusion(steps=100, num_classes=3, cond_diffuse=True, cond_opt="discrete_zero_uniform",
                                     timestep_respacing="ddim20")
    g = torch.Generator().manual_seed(1)
    y = onehot(torch.randint(0, 3, (2, 8, 8), generator=g), 3)
    u = torch.rand(2, 1, 8, 8, generator=g)
    t = torch.tensor([0, 13])  # own (respaced) indices, K = 20
    y_t = diff.q_sample_label(y, t, noise=u)
    for b, i in enumerate([0, 13]):
        gamma = 1 - (i + 1) / 20
        keep = (np.floor(gamma + u[b, 0].numpy().astype(np.float64)) >= 1).astype(np.float32)
        assert torch.equal(y_t[b], y[b] * torch.from_numpy(keep))


def test_uniform_statistical_rate():
    diff = create_gaussian_diffusion(steps=50, num_classes=2, cond_diffuse=True, cond_opt="discrete_zero_uniform")
    y = torch.zeros(1, 2, 200, 200)
    y[:, 0] = 1
    for i in [0, 10, 24, 40, 49]:
        kept = diff.q_sample_label(y, torch.tensor([i])).sum().item() / 40000
        gamma = 1 - (i + 1) / 50
        sigma = max(np.sqrt(gamma * (1 - gamma) / 40000), 1e-9)
        assert abs(kept - gamma) <= 5 * sigma + 1e-12, (i, kept, gamma)


def test_classwise_per_class_rates_on_respaced_steps(schedule_file):
    path, lam = schedule_file
    diff = create_gaussian_diffusion(steps=1000, num_classes=5, cond_diffuse=True, cond_opt="discrete_zero_classwise",
                                     class_schedule=str(path), unlabeled_id=4, timestep_respacing="ddim25")
    n = 100
    ids = torch.arange(5).repeat_interleave(n * n // 5).reshape(1, n, n)
    y = onehot(ids, 5)
    for i in [2, 10, 20]:
        t_orig = int(diff.timestep_map[i])
        assert t_orig == 40 * i
        y_t = diff.q_sample_label(y, torch.tensor([i]))
        for c in range(5):
            lam_c = 0.5 if c == 4 else lam[c]  # unlabeled class forced to 0.5
            gamma = hand_gamma_classwise(lam_c, t_orig)
            m = (ids[0] == c)
            kept = y_t[0, c][m].mean().item()
            sigma = np.sqrt(gamma * (1 - gamma) / m.sum().item())
            assert abs(kept - gamma) <= 5 * sigma + 1e-9, (i, c, kept, gamma)
            assert y_t[0][:, m].sum(0).le(1).all()  # still one-hot or all-zero


def test_classwise_exact_for_fixed_noise_and_zero_pixels_stay_zero(schedule_file):
    path, lam = schedule_file
    diff = create_gaussian_diffusion(steps=1000, num_classes=5, cond_diffuse=True, cond_opt="discrete_zero_classwise",
                                     class_schedule=str(path), unlabeled_id=4)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 5, (1, 6, 6), generator=g)
    y = onehot(ids, 5)
    y[:, :, 0, :] = 0  # an already-masked row
    u = torch.rand(1, 1, 6, 6, generator=g)
    t = torch.tensor([600])
    y_t = diff.q_sample_label(y, t, noise=u)
    for r in range(6):
        for c in range(6):
            cls = ids[0, r, c].item()
            lam_c = 0.5 if cls == 4 else lam[cls]
            keep = np.floor(hand_gamma_classwise(lam_c, 600) + u[0, 0, r, c].item()) >= 1
            expected = y[0, :, r, c] * float(keep)
            assert torch.equal(y_t[0, :, r, c], expected)
    assert y_t[0, :, 0, :].abs().sum() == 0


def test_gaussian_option_with_injected_noise():
    diff = create_gaussian_diffusion(steps=100, num_classes=3, cond_diffuse=True, cond_opt="")
    y = onehot(torch.randint(0, 3, (2, 4, 4)), 3)
    eps = torch.randn_like(y)
    t = torch.tensor([10, 90])
    abar = torch.tensor(diff.alphas_cumprod[[10, 90]], dtype=torch.float32).view(2, 1, 1, 1)
    expected = abar.sqrt() * y + (1 - abar).sqrt() * eps
    assert torch.allclose(diff.q_sample_label(y, t, noise=eps), expected, atol=1e-6)


def test_edge_channel_never_diffuses_in_training(tiny_flags):
    flags = dict(tiny_flags, cond_diffuse=True, cond_opt="discrete_zero_uniform")
    model, diff = create_model_and_diffusion(**flags)
    seen = {}

    def spy(x, t, y=None):
        seen["y"] = y
        return model(x, t, y=y)

    y = random_label_map(2, 4, 16, 16)
    t = torch.tensor([diff.num_timesteps - 1] * 2)  # gamma = 0: every one-hot pixel masked
    diff.training_losses(spy, torch.randn(2, 3, 16, 16), t, model_kwargs={"y": y})
    assert seen["y"][:, :4].abs().sum() == 0
    assert torch.equal(seen["y"][:, 4], y[:, 4])


def test_disabled_label_diffusion_is_identity():
    diff = create_gaussian_diffusion(steps=25, num_classes=3, cond_diffuse=False)
    y = onehot(torch.randint(0, 3, (1, 4, 4)), 3)
    assert torch.equal(diff.q_sample_label(y, torch.tensor([24])), y)


def test_bad_label_diffusion_settings(tmp_path, schedule_file):
    path, _ = schedule_file
    with pytest.raises(ValueError, match="unknown --cond_opt 'discrete_zero_bogus'"):
        create_gaussian_diffusion(num_classes=5, cond_diffuse=True, cond_opt="discrete_zero_bogus")
    with pytest.raises(ValueError, match="needs a per-class lambda file"):
        create_gaussian_diffusion(num_classes=5, cond_diffuse=True, cond_opt="discrete_zero_classwise")
    with pytest.raises(ValueError, match=r"has 5 values; expected one per class, num_classes=151"):
        create_gaussian_diffusion(num_classes=151, cond_diffuse=True, cond_opt="discrete_zero_classwise",
                                  class_schedule=str(path))
    with pytest.raises(ValueError, match="file not found"):
        create_gaussian_diffusion(num_classes=5, cond_diffuse=True, cond_opt="discrete_zero_classwise",
                                  class_schedule=str(tmp_path / "missing.npy"))
    diff = create_gaussian_diffusion(steps=25, num_classes=3, cond_diffuse=True, cond_opt="discrete_zero_uniform")
    with pytest.raises(ValueError, match=r"label noise u has shape \(1, 1, 3, 3\); expected \(1, 1, 4, 4\)"):
        diff.q_sample_label(torch.zeros(1, 3, 4, 4), torch.tensor([1]), noise=torch.rand(1, 1, 3, 3))


@pytest.mark.parametrize("write, says", [
    (lambda f: np.savetxt(f, np.ones(5)), "text, not a .npy file"),
    (lambda f: np.savez(f, np.ones(5)), r"a zip archive \(.npz\?\), not a single .npy array"),
    (lambda f: None, "an empty file"),
    (lambda f: f.write(bytes(range(256))), r"not a .npy file \(no .npy header\)"),
    (lambda f: np.save(f, np.array(list("abcde"))), "holds <U1 values; expected numbers"),
    (lambda f: np.save(f, np.ones((5, 2))), r"an array of shape \(5, 2\); expected one value per class, shape \(5,\)"),
    (lambda f: f.write(np.lib.format.magic(1, 0) + b"{'descr': '<f8'"), "not a readable .npy array"),
])
def test_a_class_schedule_that_is_not_one_array_of_numbers_says_what_it_is(tmp_path, write, says):
    path = tmp_path / "lambdas.npy"
    with open(path, "wb") as f:  # a file object: numpy keeps the name as it is
        write(f)
    with pytest.raises(ValueError, match=f"^--class_schedule {path}: {says}") as e:
        load_class_schedule(str(path), 5)
    assert "allow_pickle" not in str(e.value)  # no hint towards unpickling a file


def test_a_one_row_class_schedule_loads_as_its_values(tmp_path):
    path = tmp_path / "row.npy"
    np.save(path, np.arange(5.0)[None] + 1)
    assert load_class_schedule(str(path), 5).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_released_schedule_files_load_with_unlabeled_rule(compat_dir):
    diff = create_gaussian_diffusion(num_classes=151, cond_diffuse=True, cond_opt="discrete_zero_classwise",
                                     class_schedule=str(compat_dir / "ade20k_psiphi.npy"), unlabeled_id=150)
    lam = diff.label_diffusion.class_lambdas.numpy()
    assert lam[150] == 0.5 and lam.shape == (151,)


def test_noise_spec_says_what_q_sample_takes(schedule_file):
    path, _ = schedule_file
    y_shape = (2, 5, 6, 7)  # 5 one-hot channels + an edge channel for the full model input
    full = (2, 6, 6, 7)
    uniform = create_gaussian_diffusion(steps=25, num_classes=5, cond_diffuse=True, cond_opt="discrete_zero_uniform")
    classwise = create_gaussian_diffusion(steps=25, num_classes=5, cond_diffuse=True,
                                          cond_opt="discrete_zero_classwise", class_schedule=str(path))
    gaussian = create_gaussian_diffusion(steps=25, num_classes=5, cond_diffuse=True, cond_opt="")
    off = create_gaussian_diffusion(steps=25, num_classes=5, cond_diffuse=False)
    for diff in (uniform, classwise):
        assert diff.label_diffusion.noise_spec(y_shape) == LabelNoise((1, 6, 7), "uniform")
        assert diff.label_noise_spec(full) == LabelNoise((1, 6, 7), "uniform")
    assert gaussian.label_diffusion.noise_spec(y_shape) == LabelNoise((5, 6, 7), "gaussian")
    assert gaussian.label_noise_spec(full) == LabelNoise((5, 6, 7), "gaussian")  # the edge never diffuses
    assert off.label_diffusion.noise_spec(y_shape) is None and off.label_noise_spec(full) is None
    # noise drawn to the spec is what q_sample accepts
    y = onehot(torch.randint(0, 5, (2, 6, 7)), 5)
    for diff, draw in ((uniform, torch.rand), (gaussian, torch.randn)):
        spec = diff.label_noise_spec(full)
        diff.q_sample_label(y, torch.tensor([3, 7]), noise=draw(2, *spec.shape))
