"""evaluations/: FID, LPIPS diversity, mIoU and the report, on tiny folders with random-weight networks."""
import json
import os
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from evaluations import fid as fid_mod
from evaluations import lpips as lpips_mod
from evaluations import miou as miou_mod
from evaluations import report as report_mod
from evaluations.common import EvalError, list_images, load_rgb, match_names
from scdm.runtime.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder, n, size=16, seed=0, names=None, ext="png"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names or [f"{i:03d}" for i in range(n)]:
        w, h = (size, size) if isinstance(size, int) else size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.{ext}")
    return folder


def pooled(x):
    """A tiny deterministic feature extractor: 2x2 average colours -> 12 features."""
    return F.adaptive_avg_pool2d(x, 2).flatten(1)


def run_module(*args):
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty torch hub cache, so that no pretrained weights are found."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


# ------------------------------------------------------------------------------------ FID
def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid_mod.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_against_scipy_symmetric_form():
    rng = np.random.default_rng(1)
    d = 8
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    r1 = linalg.sqrtm(s1).real  # Tr sqrt(s1 s2) = Tr sqrt(r1 s2 r1), the latter symmetric PSD
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid_mod.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def _few_image_features(n, d, seed):
    """(n, d) features with n <= d: their covariance is singular (rank n - 1)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)


def _frechet_by_nuclear_norm(f1, f2):
    """The Frechet distance without any matrix square root: with S_i = A_i A_i^T (A_i the centred
    features / sqrt(n - 1)), the nonzero eigenvalues of S1 S2 are the squared singular values of
    A_1^T A_2, so Tr sqrt(S1 S2) is the nuclear norm of A_1^T A_2."""
    a1 = (f1 - f1.mean(0)).T / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)).T / np.sqrt(len(f2) - 1)
    diff = f1.mean(0) - f2.mean(0)
    nuclear = np.linalg.svd(a1.T @ a2, compute_uv=False).sum()
    return diff @ diff + (a1 ** 2).sum() + (a2 ** 2).sum() - 2 * nuclear


@pytest.mark.parametrize("n, d", [(5, 12), (12, 12), (40, 12)])
def test_trace_sqrt_product_against_nuclear_norm(n, d):
    """The symmetric-form trace is exact for singular (n <= d) and regular covariances alike."""
    f1, f2 = _few_image_features(n, d, 3), _few_image_features(n + 2, d, 4)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    a1 = (f1 - f1.mean(0)).T / np.sqrt(n - 1)
    a2 = (f2 - f2.mean(0)).T / np.sqrt(n + 1)
    expected = np.linalg.svd(a1.T @ a2, compute_uv=False).sum()
    assert fid_mod.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_falls_back_to_symmetric_form_when_sqrtm_goes_complex(monkeypatch):
    """Where pytorch-fid's sqrtm fails (how often depends on the LAPACK build and the CPU's rounding),
    the distance of N < D images is still the exact, real, non-negative value."""
    import pytorch_fid.fid_score as pf

    calls = []

    def complex_sqrtm(*args, **kwargs):
        calls.append(1)
        raise ValueError("Imaginary component 519.6")

    monkeypatch.setattr(pf, "calculate_frechet_distance", complex_sqrtm)
    f1, f2 = _few_image_features(6, 30, 5), _few_image_features(8, 30, 6)
    value = fid_mod.frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert calls == [1]
    expected = _frechet_by_nuclear_norm(f1, f2)
    assert expected > 0 and value == pytest.approx(expected, rel=1e-7)
    assert fid_mod.frechet_distance(f1.mean(0), np.cov(f1, rowvar=False),
                                    f1.mean(0), np.cov(f1, rowvar=False)) == pytest.approx(0, abs=1e-9 * expected)


def test_frechet_distance_of_few_images_matches_nuclear_norm_on_either_path():
    """N < D end to end, whichever path this machine's LAPACK takes: never an error, and the value
    agrees with the square-root-free formula."""
    f1, f2 = _few_image_features(6, 30, 7), _few_image_features(9, 30, 8)
    value = fid_mod.frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert value == pytest.approx(_frechet_by_nuclear_norm(f1, f2), rel=1e-4)


def test_frechet_distance_rejects_mismatched_covariance():
    with pytest.raises(EvalError, match="covariance shapes"):
        fid_mod.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_fid_of_folder_with_itself_is_zero(tmp_path):
    a = write_images(tmp_path / "a", 24)
    feats = pooled(torch.stack([load_rgb(p)[0] for p in list_images(a).values()])).double().numpy()
    value = fid_mod.compute_fid(a, a, feature_fn=pooled, device="cpu")
    assert abs(value) <= 1e-6 * np.trace(np.cov(feats, rowvar=False))


def test_compute_fid_equals_statistics_by_hand(tmp_path):
    a, b = write_images(tmp_path / "a", 20, seed=1), write_images(tmp_path / "b", 20, seed=2)

    def stats(folder):
        x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                         for p in sorted(folder.iterdir())])
        f = pooled(x).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    expected = fid_mod.frechet_distance(*stats(a), *stats(b))
    assert expected > 0
    assert fid_mod.compute_fid(a, b, feature_fn=pooled, batch_size=7) == pytest.approx(expected, rel=1e-9)


def test_fid_size_policy_resizes_samples_to_gt_size_bicubic(tmp_path, capsys):
    gt = write_images(tmp_path / "gt", 16, size=24, seed=3)
    small = write_images(tmp_path / "small", 16, size=(12, 20), seed=4)
    resized = tmp_path / "resized"
    resized.mkdir()
    for p in small.iterdir():
        Image.open(p).resize((24, 24), Image.BICUBIC).save(resized / p.name)
    value = fid_mod.compute_fid(small, gt, feature_fn=pooled)
    assert "16 of 16 images" in capsys.readouterr().err
    assert value == pytest.approx(fid_mod.compute_fid(resized, gt, feature_fn=pooled), rel=1e-12)


class CountingFeatures:
    identity = "pooled-v1"

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return pooled(x)


def test_fid_ground_truth_cache_is_reused_and_invalidated(tmp_path, capsys):
    a, gt = write_images(tmp_path / "a", 12, seed=5), write_images(tmp_path / "gt", 12, seed=6)
    cache = tmp_path / "gt.npz"
    f = CountingFeatures()
    first = fid_mod.compute_fid(a, gt, feature_fn=f, batch_size=50, save_stats_path=cache)
    assert f.calls == 2 and cache.is_file()
    assert fid_mod.compute_fid(a, gt, feature_fn=f, save_stats_path=cache) == pytest.approx(first, rel=1e-12)
    assert f.calls == 3  # only the samples were run
    # the cache is itself a statistics file usable as GT
    assert fid_mod.compute_fid(a, cache, feature_fn=f) == pytest.approx(first, rel=1e-12)
    write_images(gt, 0, seed=7, names=["000"])  # a changed file -> stale
    capsys.readouterr()
    fid_mod.compute_fid(a, gt, feature_fn=f, save_stats_path=cache)
    assert "stale" in capsys.readouterr().err and f.calls == 6
    other = CountingFeatures()
    other.identity = "pooled-v2"  # other weights -> stale too
    fid_mod.compute_fid(a, gt, feature_fn=other, save_stats_path=cache)
    assert other.calls == 2
    with pytest.raises(EvalError, match="computed with features 'pooled-v2'"):
        fid_mod.compute_fid(a, cache, feature_fn=f)


def test_fid_bad_inputs(tmp_path, no_hub):
    a = write_images(tmp_path / "a", 4, names=["x", "y", "z", "w"])
    b = write_images(tmp_path / "b", 4, names=["x", "y", "q", "r"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="holds no images"):
        fid_mod.compute_fid(tmp_path / "empty", a, feature_fn=pooled)
    with pytest.raises(EvalError, match=r"a lacks 2: q, r; .*b lacks 2: w, z"):
        fid_mod.compute_fid(a, b, feature_fn=pooled)
    with pytest.raises(EvalError, match="not found"):
        fid_mod.compute_fid(tmp_path / "nope", a, feature_fn=pooled)
    msg = str(pytest.raises(EvalError, fid_mod.compute_fid, a, a).value)
    assert fid_mod.INCEPTION_FILE in msg and str(no_hub / "hub" / "checkpoints") in msg and "--weights" in msg


def test_inception_weights_from_hub_cache_and_wrong_file(tmp_path, no_hub):
    ckpt = no_hub / "hub" / "checkpoints" / fid_mod.INCEPTION_FILE
    ckpt.parent.mkdir(parents=True)
    state = fid_mod.random_inception_state()
    torch.save(state, ckpt)
    net = fid_mod.InceptionFeatures(fid_mod.inception_weights(), dims=64)
    assert torch.equal(net.net.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    assert net.identity.startswith("inception-sha256:")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    from pytorch_fid import inception as pf
    download = pf.load_state_dict_from_url
    with pytest.raises(EvalError, match="is not the pytorch-fid Inception state dict"):
        fid_mod.InceptionFeatures(str(bad), dims=64)
    assert pf.load_state_dict_from_url is download  # put back after a failed build too


def test_fid_cli_random_inception(tmp_path, no_hub):
    a, b = write_images(tmp_path / "a", 5, seed=8), write_images(tmp_path / "b", 5, seed=9)
    cache = tmp_path / "gt.npz"
    common = ["--weights", "random", "--dims", "64", "--device", "cpu", "--num-workers", "0", "-b", "3"]
    assert abs(fid_mod.compute_fid(a, a, weights="random", dims=64, device="cpu")) < 1e-3
    cli = run_module("evaluations.fid", "--path", str(b), str(a), "--save-stats", str(cache), *common)
    assert cli.returncode == 0, cli.stderr
    expected = fid_mod.compute_fid(b, a, weights="random", dims=64, device="cpu", batch_size=5)
    assert float(re.search(r"FID: (\S+)", cli.stdout).group(1)) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert cache.is_file()


def test_fid_cli_missing_weights_one_message(tmp_path, no_hub, capsys):
    from evaluations.fid.__main__ import main
    a = write_images(tmp_path / "a", 3)
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--path", str(a), str(a), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: missing pytorch-fid")
    assert f"put '{fid_mod.INCEPTION_FILE}' in {no_hub / 'hub' / 'checkpoints'}/" in err


def test_fid_unpaired_is_a_boolean_flag():
    from evaluations.fid.__main__ import parse_args
    assert parse_args(["--path", "a", "b"]).unpaired is False
    assert parse_args(["--path", "a", "b", "--unpaired"]).unpaired is True
    assert parse_args(["--path", "a", "b", "--unpaired", "False"]).unpaired is False


# ---------------------------------------------------------------------------------- LPIPS
def make_sets(results, k, names, size=32, seed=10):
    return [write_images(Path(results) / f"samples_{i}", 0, size=size, seed=seed + i, names=names) for i in range(k)]


def test_lpips_diversity_equals_hand_computed_mean_over_pairs(tmp_path):
    names = ["a", "b"]
    sets = make_sets(tmp_path / "res", 3, names)
    got = lpips_mod.lpips_diversity(lpips_mod.find_sample_sets(tmp_path / "res"), weights="random",
                                    batch_size=2, device="cpu")
    model = lpips_mod.lpips_model("random")
    per_name = []
    with torch.no_grad():
        for n in names:
            imgs = [load_rgb(s / f"{n}.png")[0][None] * 2 - 1 for s in sets]
            per_name.append(np.mean([model(imgs[i], imgs[j]).item() for i, j in combinations(range(3), 2)]))
    assert got["num_sets"] == 3 and got["num_pairs"] == 3 and got["num_names"] == 2
    assert got["per_name"]["a"] == pytest.approx(per_name[0], rel=1e-5)
    assert got["lpips"] == pytest.approx(np.mean(per_name), rel=1e-5)
    assert got["lpips"] > 0


def test_lpips_size_policy_and_mixed_sizes(tmp_path, capsys):
    """Label maps of different sizes are batched apart; sets 1.. are resized to set 0 (bicubic)."""
    res = tmp_path / "res"
    write_images(res / "samples_0", 0, size=8, seed=1, names=["a"])
    write_images(res / "samples_0", 0, size=12, seed=2, names=["b"])
    write_images(res / "samples_1", 0, size=6, seed=3, names=["a", "b"])
    l1 = lambda a, b: (a - b).abs().mean((1, 2, 3))  # noqa: E731
    got = lpips_mod.lpips_diversity(lpips_mod.find_sample_sets(res), distance_fn=l1, batch_size=8)
    assert "2 of 2 samples of sets 1..K-1 resized" in capsys.readouterr().err
    for name, side in (("a", 8), ("b", 12)):
        a = load_rgb(res / "samples_0" / f"{name}.png")[0]
        second = Image.open(res / "samples_1" / f"{name}.png").resize((side, side), Image.BICUBIC)
        b = torch.from_numpy(np.array(second))
        b = b.permute(2, 0, 1).float() / 255
        assert got["per_name"][name] == pytest.approx(float(l1(a[None] * 2 - 1, b[None] * 2 - 1)), rel=1e-6)


def test_lpips_backbone_from_torchvision_state_dict(tmp_path, no_hub):
    import torchvision
    tv = torchvision.models.alexnet(weights=None)
    ckpt = no_hub / "hub" / "checkpoints" / lpips_mod.backbone_file("alex")
    ckpt.parent.mkdir(parents=True)
    torch.save({k: v for k, v in tv.state_dict().items() if k.startswith("features.")}, ckpt)
    assert ckpt.name == "alexnet-owt-7be5be79.pth"
    model = lpips_mod.lpips_model(lpips_mod.backbone_weights())
    assert torch.equal(model.net.slice1[0].weight, tv.features[0].weight)
    assert torch.equal(model.net.slice5._modules["10"].weight, tv.features[10].weight)


def test_lpips_bad_inputs(tmp_path, no_hub):
    res = tmp_path / "res"
    write_images(res / "samples", 2, size=8)
    assert lpips_mod.find_sample_sets(res) == [res / "samples"]
    with pytest.raises(EvalError, match="at least 2 sample sets"):
        lpips_mod.lpips_diversity(lpips_mod.find_sample_sets(res), distance_fn=lambda a, b: a.mean((1, 2, 3)))
    make_sets(res, 2, ["a", "b"], size=8)
    with pytest.raises(EvalError, match="lacks samples_2, samples_3"):
        lpips_mod.find_sample_sets(res, 4)
    write_images(res / "samples_3", 2, size=8)  # a gap: samples_2 is missing
    with pytest.raises(EvalError, match="has samples_3 but no samples_2: the sets must be consecutive"):
        lpips_mod.find_sample_sets(res)
    assert len(lpips_mod.find_sample_sets(res, 2)) == 2
    import shutil
    shutil.rmtree(res / "samples_3")
    with pytest.raises(EvalError, match="image pairs of 8x8: .*at least 32x32"):
        lpips_mod.lpips_diversity(lpips_mod.find_sample_sets(res), weights="random")
    write_images(res / "samples_1", 0, size=8, names=["c"])
    with pytest.raises(EvalError, match="samples_0 lacks 1: c"):
        lpips_mod.lpips_diversity(lpips_mod.find_sample_sets(res), distance_fn=lambda a, b: a.mean((1, 2, 3)))
    msg = str(pytest.raises(EvalError, lpips_mod.backbone_weights).value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(no_hub / "hub" / "checkpoints") in msg


def test_lpips_cli_random_backbone(tmp_path, capsys):
    make_sets(tmp_path / "res", 2, ["a", "b", "c"], size=32)
    out = tmp_path / "lpips.json"
    from evaluations.lpips.__main__ import main
    main(["--results", str(tmp_path / "res"), "--weights", "random", "--device", "cpu", "-b", "2", "--out", str(out)])
    expected = lpips_mod.lpips_diversity(lpips_mod.find_sample_sets(tmp_path / "res"), weights="random")
    assert json.loads(out.read_text())["lpips"] == pytest.approx(expected["lpips"], rel=1e-5)
    assert "2 sets, 3 label maps" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- mIoU
def test_confusion_matrix_and_iou_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 9, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 3]])
    cm = miou_mod.confusion_matrix(pred, gt, num_classes=4, ignore_index=9)
    hand = np.zeros((4, 4), int)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != 9:
            hand[g, p] += 1
    np.testing.assert_array_equal(cm, hand)
    s = miou_mod.scores(cm)
    # class 0: TP 1, FN 1, FP 1 -> 1/3; class 1: TP 2, FN 1, FP 1 -> 2/4; class 2: TP 1, FN 1 -> 1/2
    # class 3 is only predicted (absent from the ground truth): not averaged
    assert s["per_class_iou"][:3] == pytest.approx([1 / 3, 1 / 2, 1 / 2]) and s["per_class_iou"][3] is None
    assert s["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert s["pixel_accuracy"] == pytest.approx(4 / 7) and s["classes_present"] == [0, 1, 2]


def save_ids(folder, name, ids):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(ids, np.uint8)).save(folder / f"{name}.png")


def test_miou_ade20k_mapping_and_folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    raw = np.array([[0, 1, 1, 150], [2, 2, 3, 0]])  # raw 0 unlabeled, raw k -> class k-1
    save_ids(gt, "x", raw)
    save_ids(pred, "x", np.array([[7, 0, 0, 150 - 1], [1, 0, 2, 5]]))
    res = miou_mod.miou_of_folders(pred, gt, dataset="ade20k")
    # class 0: TP 2, FP 1 -> 2/3; class 1: TP 1, FN 1 -> 1/2; class 2: 1/1; class 149: 1/1
    assert res["num_classes"] == 150 and res["classes_present"] == [0, 1, 2, 149]
    assert res["miou"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 1) / 4)
    assert res["num_pixels"] == 6


def test_miou_presets_come_from_the_dataset_table():
    expect = {"ade20k": (150, 0, 1), "coco": (182, 255, 0), "celeba": (19, None, 0), "cityscapes": (35, 0, 0),
              "toy": (8, 7, 0)}
    for dataset, (n, ignore, shift) in expect.items():
        assert miou_mod.label_spec(dataset) == miou_mod.LabelSpec(n, ignore, shift), dataset
    assert miou_mod.label_spec("folder", num_classes=5, ignore_index=2) == miou_mod.LabelSpec(5, 2, 0)
    assert miou_mod.class_names_of("cityscapes")[7] == "road" and miou_mod.class_names_of("coco")[181] == "wood"
    assert len(miou_mod.class_names_of("ade20k")) == 150


def test_miou_cityscapes_ignores_raw_unlabeled(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save_ids(gt, "frankfurt_000000_000019", np.array([[0, 7, 7, 26], [0, 26, 33, 34]]))
    save_ids(pred, "frankfurt_000000_000019", np.array([[5, 7, 8, 26], [26, 26, 33, 34]]))
    res = miou_mod.miou_of_folders(pred, gt, dataset="cityscapes")
    # raw 0 is not scored; class 7: TP 1, FN 1 -> 1/2; class 26: TP 2, FP 0 -> 1; 33, 34: 1; 8 only predicted
    assert res["num_classes"] == 35 and res["ignore_index"] == 0 and res["classes_present"] == [7, 26, 33, 34]
    assert res["miou"] == pytest.approx((1 / 2 + 1 + 1 + 1) / 4) and res["num_pixels"] == 6
    assert res["class_names"][26] == "car"
    from evaluations.miou.__main__ import main
    out = tmp_path / "m.json"
    cli = main(["--pred", str(pred), "--gt", str(gt), "--dataset", "cityscapes", "--out", str(out)])
    assert cli["miou"] == res["miou"]
    err = capsys.readouterr().err
    assert "--dataset is deprecated" in err and "--dataset_mode" in err
    assert json.loads(out.read_text())["num_classes"] == 35


def test_list_images_uses_the_project_extensions(tmp_path):
    from scdm.data.dataset_layouts import IMAGE_EXTENSIONS
    folder = write_images(tmp_path / "a", 0, names=["x"], ext="webp")
    write_images(folder, 0, names=["y"], ext="png")
    (folder / "notes.txt").write_text("not an image")
    assert sorted(list_images(folder)) == ["x", "y"] and ".webp" in IMAGE_EXTENSIONS


def test_miou_bad_inputs(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save_ids(gt, "x", np.zeros((4, 4)))
    save_ids(pred, "x", np.full((4, 4), 200))
    with pytest.raises(EvalError, match=r"pred/x.png: predicted ids 200 are outside the class range 0..149"):
        miou_mod.miou_of_folders(pred, gt, dataset="coco", num_classes=150)
    save_ids(pred, "y", np.zeros((4, 4)))
    with pytest.raises(EvalError, match="gt lacks 1: y"):
        miou_mod.miou_of_folders(pred, gt, num_classes=3)
    (tmp_path / "rgb").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 3, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb" / "x.png")
    with pytest.raises(UserError, match="colour .RGB. image"):
        miou_mod.miou_of_folders(tmp_path / "rgb", gt, num_classes=3)
    with pytest.raises(EvalError, match="--num_classes is required"):
        miou_mod.miou_of_folders(pred, gt)


def test_miou_prediction_resized_to_label_size_nearest(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save_ids(gt, "x", np.kron(np.array([[0, 1], [2, 0]]), np.ones((4, 4))))
    save_ids(pred, "x", np.array([[0, 1], [2, 0]]))
    assert miou_mod.miou_of_folders(pred, gt, num_classes=3)["miou"] == 1.0
    assert "1 of 1 predictions resized" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from scdm.toy import make_toy_dataset
    return Path(make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", 1, 6, 32, 0))


def test_toy_segmenter_recovers_labels_exactly(toy, tmp_path):
    from scdm.toy import segment_toy_image
    for name in sorted((toy / "test" / "images").iterdir()):
        image = np.asarray(Image.open(name).convert("RGB"))
        label = np.asarray(Image.open(toy / "test" / "labels" / name.name)).astype(np.int64)
        np.testing.assert_array_equal(segment_toy_image(image), label)
    out = tmp_path / "m.json"
    from evaluations.miou.__main__ import main
    res = main(["--segmenter", "toy", "--samples", str(toy / "test" / "images"), "--gt", str(toy / "test" / "labels"),
                "--out", str(out), "--save_pred_dir", str(tmp_path / "pred")])
    assert res["miou"] == 1.0 and res["pixel_accuracy"] == 1.0 and json.loads(out.read_text())["miou"] == 1.0
    # the saved predictions score the same through the folder path
    assert miou_mod.miou_of_folders(tmp_path / "pred", toy / "test" / "labels", dataset="toy")["miou"] == 1.0


@pytest.mark.parametrize("where, says", [
    (["--save_pred_dir", "{samples}"], "--save_pred_dir {samples} overlaps the --samples folder"),
    (["--save_pred_dir", "{gt}"], "--save_pred_dir {gt} overlaps the --gt folder"),
    (["--save_pred_dir", "{gt}/more"], "overlaps the --gt folder"),
    (["--out", "{samples}/00000.png"], "--out {samples}/00000.png lies in the --samples folder"),
    (["--out", "{other}"], "--out {other} exists and is not a .json file"),
])
def test_miou_never_writes_over_what_it_scores(toy, tmp_path, where, says):
    import shutil
    samples, gt = tmp_path / "samples", tmp_path / "gt"
    shutil.copytree(toy / "test" / "images", samples)
    shutil.copytree(toy / "test" / "labels", gt)
    (tmp_path / "notes.png").write_bytes(b"mine")
    names = dict(samples=samples, gt=gt, other=tmp_path / "notes.png")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    from evaluations.miou.__main__ import main
    with pytest.raises(EvalError, match=re.escape(says.format(**names))):
        main(["--segmenter", "toy", "--samples", str(samples), "--gt", str(gt), *(w.format(**names) for w in where)])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_miou_save_pred_dir_needs_the_toy_segmenter(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save_ids(gt, "x", np.zeros((4, 4)))
    save_ids(pred, "x", np.zeros((4, 4)))
    from evaluations.miou.__main__ import main
    with pytest.raises(EvalError, match="with --pred they exist already"):
        main(["--pred", str(pred), "--gt", str(gt), "--num_classes", "3", "--save_pred_dir", str(tmp_path / "p2")])
    assert not (tmp_path / "p2").exists()


@pytest.mark.parametrize("write, says", [
    (lambda p: p.write_text("hello"), "it holds text (5 bytes), not a torch file"),
    (lambda p: p.write_bytes(b""), "it is empty (0 bytes)"),
    (lambda p: torch.save(torch.nn.Linear(2, 2), p), "it holds Python objects, not only tensors"),
])
def test_an_unreadable_weights_file_is_one_line_without_unpickling_advice(tmp_path, write, says):
    path = tmp_path / "weights.pth"
    write(path)
    for read in (lambda: fid_mod.InceptionFeatures(str(path)), lambda: lpips_mod.lpips_model(str(path))):
        with pytest.raises(EvalError) as e:
            read()
        message = str(e.value)
        assert message.startswith(f"cannot read weights file {path} (expected ") and says in message
        assert "\n" not in message and "weights_only" not in message


@pytest.mark.parametrize("write, what", [
    (lambda f: f.write(b"mu sigma"), "another format"),
    (lambda f: np.save(f, np.ones(3)), "a single .npy array"),
    (lambda f: None, "an empty file"),
])
def test_a_statistics_file_that_is_not_an_npz_says_so(tmp_path, write, what):
    path = tmp_path / "stats.npz"
    with open(path, "wb") as f:
        write(f)
    with pytest.raises(EvalError, match=re.escape(f"{path} is not an .npz statistics file ({what})")) as e:
        fid_mod.load_stats(path)
    assert "allow_pickle" not in str(e.value)


# --------------------------------------------------------------------------------- report
def results_folder(toy, root, num_sets=2):
    """A sampler-like results folder on the toy test split, samples = noisy ground truth."""
    import shutil
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        shutil.copytree(toy / "test" / sub, root / sub)
    for k in range(num_sets):
        (root / f"samples_{k}").mkdir()
        for p in sorted((toy / "test" / "images").iterdir()):
            img = np.asarray(Image.open(p)).astype(int) + rng.integers(-15, 16, (32, 32, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"samples_{k}" / p.name)
    return root


def test_report_runs_what_applies(toy, tmp_path, no_hub):
    res = results_folder(toy, tmp_path / "res")
    rep = report_mod.main(["--results", str(res), "--dataset_mode", "toy", "--fid-weights", "random",
                           "--lpips-weights", "random", "--dims", "64", "--device", "cpu"])
    written = json.loads((res / "report.json").read_text())
    assert written["num_images"] == 6 == rep["num_images"]
    assert written["fid"]["status"] == "ok" and written["fid"]["value"] > 0
    assert written["lpips"]["status"] == "ok" and written["lpips"]["num_sets"] == 2
    assert written["miou"]["status"] == "ok" and written["miou"]["value"] == 1.0
    md = (res / "report.md").read_text()
    assert "| mIoU % (higher is better) | 100.00 |" in md and "| images | 6 |" in md
    assert (res / "fid_gt_stats.npz").is_file()


def test_report_skips_without_weights_or_predictions(toy, tmp_path, no_hub, capsys):
    res = results_folder(toy, tmp_path / "res", num_sets=1)
    rep = report_mod.main(["--results", str(res), "--out-prefix", "r2", "--dataset", "folder"])
    assert "--dataset is deprecated" in capsys.readouterr().err and rep["settings"]["dataset"] == "folder"
    assert rep["fid"]["status"].startswith("skipped: missing pytorch-fid Inception weights")
    assert fid_mod.INCEPTION_FILE in rep["fid"]["status"] and "--fid-weights" in rep["fid"]["status"]
    assert rep["lpips"]["status"].startswith("skipped: needs at least 2 sample sets")
    assert rep["miou"]["status"].startswith("skipped: no predictions")
    assert (res / "r2.json").is_file() and (res / "r2.md").is_file()


def test_report_failed_metric_exits_2_after_writing(tmp_path, no_hub, capsys):
    res = tmp_path / "res"
    write_images(res / "images", 3, size=8)
    write_images(res / "samples", 3, size=8)
    save_ids(res / "labels", "000", np.zeros((8, 8)))
    for n in ("000", "001", "002"):
        save_ids(res / "pred", n, np.full((8, 8), 9))
    save_ids(res / "labels", "001", np.zeros((8, 8)))
    save_ids(res / "labels", "002", np.zeros((8, 8)))
    with pytest.raises(SystemExit) as e:
        report_mod.main(["--results", str(res), "--num_classes", "3"])
    assert e.value.code == 2
    status = json.loads((res / "report.json").read_text())["miou"]["status"]
    assert status.startswith("failed:") and "predicted ids 9" in status
    assert f"error: miou {status}" in capsys.readouterr().err  # the reason, not only "see the report"


@pytest.mark.parametrize("flags, says", [
    (["--gt", "/no/such"], "--gt /no/such: not a folder of real images"),
    (["--miou_gt", "clea"], "--miou_gt clea: expected clean or noisy, or a folder of label maps"),
    (["--fid-weights", "/no/inception.pth"], "--fid-weights /no/inception.pth: file not found"),
    (["--lpips-weights", "."], "--lpips-weights .: a folder"),
    (["--out-prefix", ""], "--out-prefix '': expected a file name prefix"),
])
def test_a_mistyped_report_flag_keeps_the_earlier_report(toy, tmp_path, no_hub, flags, says):
    res = results_folder(toy, tmp_path / "res", num_sets=1)
    (res / "report.json").write_text('{"earlier": true}')
    with pytest.raises(EvalError, match=re.escape(says)):
        report_mod.main(["--results", str(res), "--dataset_mode", "toy", *flags])
    assert (res / "report.json").read_text() == '{"earlier": true}'


def test_report_with_an_unreadable_manifest_does_not_call_the_labels_clean(toy, tmp_path, no_hub):
    """Only the manifest says whether labels/ are a noisy tree's maps: unreadable, mIoU against
    "clean" fails (exit 2) instead of scoring the noisy maps as the clean annotations."""
    res = results_folder(toy, tmp_path / "res", num_sets=1)
    (res / "manifest.json").write_text("{bad")
    with pytest.raises(SystemExit) as e:
        report_mod.main(["--results", str(res), "--dataset_mode", "toy"])
    assert e.value.code == 2
    status = json.loads((res / "report.json").read_text())["miou"]["status"]
    assert status.startswith(f"failed: {res / 'manifest.json'} is unreadable") and "--miou_gt noisy" in status
    rep = report_mod.main(["--results", str(res), "--dataset_mode", "toy", "--miou_gt", "noisy"])
    assert rep["miou"]["status"] == "ok"


def test_match_names_lists_both_sides(tmp_path):
    a = write_images(tmp_path / "a", 0, names=["1", "2"], size=4)
    b = write_images(tmp_path / "b", 0, names=["2", "3"], size=4, ext="jpg")
    with pytest.raises(EvalError) as e:
        match_names([(a, list_images(a)), (b, list_images(b))])
    assert "b lacks 1: 1" in str(e.value) and "a lacks 1: 3" in str(e.value)
    write_images(tmp_path / "b", 0, names=["1"], size=4)
    write_images(tmp_path / "a", 0, names=["3"], size=4)
    assert match_names([(a, list_images(a)), (b, list_images(b))]) == ["1", "2", "3"]  # stems match across .png/.jpg


def test_report_files_honour_the_umask(toy, tmp_path, no_hub):
    import stat
    res = results_folder(toy, tmp_path / "res", num_sets=1)
    old = os.umask(0o022)
    try:
        report_mod.main(["--results", str(res)])
    finally:
        os.umask(old)
    for name in ("report.json", "report.md"):
        assert stat.S_IMODE((res / name).stat().st_mode) == 0o644
    assert [p.name for p in res.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------ the noisy-benchmark protocol
@pytest.fixture(scope="module")
def edge_results(toy, tmp_path_factory):
    """Samples of a tiny random model from an Edge tree of the toy test maps (image_process), as the
    sampler writes them: manifest with the tree's corruption.json, labels/ = the noisy maps."""
    from image_process import edge
    from scdm import image_sample
    from tiny_run import make_tiny_run
    root = tmp_path_factory.mktemp("edge_protocol")
    assert edge.main(["--data_dir", str(toy), "--dataset_mode", "folder", "--out_dir", str(root / "edge"),
                      "--image_size", "32", "--radius", "3", "--quiet"]) == 0
    model = make_tiny_run(root / "run", image_size=32, num_classes=8, unlabeled_id=7)
    image_sample.main(["--model_path", str(model), "--data_dir", str(root / "edge"), "--results_path",
                       str(root / "res"), "--timestep_respacing", "ddim2", "--batch_size", "3"])
    return root / "res"


def test_noisy_tree_samples_are_scored_against_the_clean_annotations(toy, edge_results, no_hub):
    res = edge_results
    manifest = json.loads((res / "manifest.json").read_text())
    assert manifest["labels"]["corruption"]["noise"] == "edge"
    clean = miou_mod.miou_of_toy_samples(res / "samples", toy / "test" / "labels")["miou"]
    noisy = miou_mod.miou_of_toy_samples(res / "samples", res / "labels")["miou"]
    assert clean != noisy  # the Edge holes make the two ground truths differ
    report_mod.main(["--results", str(res), "--dataset_mode", "toy", "--fid-weights", "random", "--lpips-weights",
                     "random", "--dims", "64", "--device", "cpu", "--out-prefix", "clean"])
    entry = json.loads((res / "clean.json").read_text())["miou"]
    assert entry["status"] == "ok" and entry["value"] == pytest.approx(clean, abs=1e-12)
    assert entry["gt"] == "clean" and Path(entry["gt_labels"]) == toy.resolve()
    assert "the clean annotations of" in (res / "clean.md").read_text()
    report_mod.main(["--results", str(res), "--dataset_mode", "toy", "--fid-weights", "random", "--lpips-weights",
                     "random", "--dims", "64", "--device", "cpu", "--out-prefix", "noisy", "--miou_gt", "noisy"])
    entry = json.loads((res / "noisy.json").read_text())["miou"]
    assert entry["gt"] == "noisy" and entry["value"] == pytest.approx(noisy, abs=1e-12)
    from evaluations.miou.__main__ import main as miou_main
    assert miou_main(["--results", str(res), "--dataset_mode", "toy"])["miou"] == pytest.approx(clean, abs=1e-12)
    got = miou_main(["--results", str(res), "--dataset_mode", "toy", "--miou_gt", str(toy / "test" / "labels")])
    assert got["gt"] == "folder" and got["miou"] == pytest.approx(clean, abs=1e-12)


def test_a_missing_clean_source_is_one_line(toy, edge_results, tmp_path, capsys):
    import shutil
    res = Path(shutil.copytree(edge_results, tmp_path / "res"))
    manifest = json.loads((res / "manifest.json").read_text())
    manifest["labels"]["corruption"]["data_dir"] = str(tmp_path / "moved")
    (res / "manifest.json").write_text(json.dumps(manifest))
    from evaluations.miou.__main__ import main as miou_main
    with pytest.raises(SystemExit) as e:
        run_cli(miou_main, ["--results", str(res), "--dataset_mode", "toy"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert str(tmp_path / "moved") in err and "--miou_gt" in err


def test_unlabeled_handling_is_said_and_recorded_without_corruption_json(toy, tmp_path, capsys):
    """An SCDM model on a tree without corruption.json (e.g. a noisy set made elsewhere): the log says
    how unlabeled pixels reach the model and the flag that changes it; the manifest records it."""
    from scdm import image_sample
    from tiny_run import make_tiny_run
    model = make_tiny_run(tmp_path / "run", image_size=32, num_classes=8, unlabeled_id=7)
    for flag, words in (("False", "as the unlabeled class 7"), ("True", "as the all-zero [MASK] state")):
        out = tmp_path / f"res_{flag}"
        image_sample.main(["--model_path", str(model), "--data_dir", str(toy), "--results_path", str(out),
                           "--timestep_respacing", "ddim2", "--num_samples", "1", "--unlabeled_to_zero", flag])
        err = capsys.readouterr().err
        assert f"unlabeled pixels (id 7) reach the model {words} (--unlabeled_to_zero {flag})" in err
        assert ("--unlabeled_to_zero True (the [MASK] state)" in err) == (flag == "False")
        assert json.loads((out / "manifest.json").read_text())["labels"]["unlabeled"] == words


@pytest.mark.parametrize("mu, sigma, words", [
    ([np.nan, 0.0], np.eye(2), "NaN or Inf"),
    ([0.0, 0.0], np.eye(3), "expected (D,) and (D, D)"),
])
def test_damaged_statistics_files_are_refused(tmp_path, mu, sigma, words):
    from evaluations.fid import load_stats
    np.savez(tmp_path / "s.npz", mu=np.array(mu), sigma=sigma)
    with pytest.raises(EvalError, match=re.escape(words)):
        load_stats(tmp_path / "s.npz")
