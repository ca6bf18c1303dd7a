"""Frechet Inception Distance between a folder of samples and ground truth, compatible with pytorch-fid.

The network (pytorch-fid's InceptionV3, pool3 = 2048 features) and the distance
(`calculate_frechet_distance`) come from the pytorch-fid package; this module adds what the
package lacks here: local weights without downloads, the size policy of `evaluations.common`,
name matching between sample and ground-truth folders, an injectable feature extractor
(tests, other backbones), and ground-truth statistics cached in a fingerprinted `.npz`.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from evaluations.common import (
    EvalError, default_device, folder_fingerprint, image_size, list_images, load_rgb,
    match_names, note_resized, resolve_weights,
)
from scdm.checkpoint import unreadable_reason
from scdm.data.datasets import iter_user_errors_clean
from scdm.runtime.fileio import atomic_write, file_sha256
from scdm.runtime.stop_signals import worker_options

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
DIMS = (64, 192, 768, 2048)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] -> (B, D)


def inception_weights(weights: Optional[str] = None, flag: str = "--weights") -> str:
    """Path of the pytorch-fid Inception weights (`flag`, else the torch hub cache), or 'random'."""
    return resolve_weights(weights, INCEPTION_FILE, "pytorch-fid Inception", flag, INCEPTION_URL)


class InceptionFeatures(torch.nn.Module):
    """pytorch-fid's InceptionV3 truncated at the block giving `dims` features, spatially averaged.

    `weights` is a state-dict file or 'random' (a fixed-seed random network, for tests only).
    `identity` names the weights and dims, so that cached statistics are never mixed up.
    """

    def __init__(self, weights: str, dims: int = 2048):
        super().__init__()
        from pytorch_fid import inception as pf
        if dims not in pf.InceptionV3.BLOCK_INDEX_BY_DIM:
            raise EvalError(f"--dims {dims}: choose one of {sorted(pf.InceptionV3.BLOCK_INDEX_BY_DIM)}")
        if weights == "random":
            state, self.identity = random_inception_state(), f"inception-random-seed0/dims{dims}"
        else:
            state = _read_state_dict(weights, INCEPTION_FILE)
            self.identity = f"inception-sha256:{file_sha256(Path(weights))}/dims{dims}"
        self.dims = dims
        with pytorch_fid_loads(state):
            try:
                self.net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
            except RuntimeError as e:  # wrong keys or shapes
                raise EvalError(f"{weights} is not the pytorch-fid Inception state dict "
                                f"'{INCEPTION_FILE}': {str(e).splitlines()[0]}") from None
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)[0]
        if f.shape[2:] != (1, 1):
            f = torch.nn.functional.adaptive_avg_pool2d(f, 1)
        return f.flatten(1)


@contextlib.contextmanager
def pytorch_fid_loads(state: dict):
    """While open, pytorch-fid's InceptionV3 constructor gets `state` where it would download its weights.

    pytorch-fid has no argument for local weights: `InceptionV3(...)` builds the FID Inception and
    fills it with `load_state_dict_from_url(FID_WEIGHTS_URL)`, looked up in `pytorch_fid.inception`.
    That one function is swapped for one returning `state`, and put back on exit however the block ends.
    """
    from pytorch_fid import inception as pf
    download = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        pf.load_state_dict_from_url = download


@functools.lru_cache(maxsize=1)
def random_inception_state() -> dict:
    """Random weights with the key layout of the FID Inception (its patched blocks keep
    torchvision's parameter names), from a fixed seed so that runs agree. Read-only: callers copy."""
    import torchvision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                              init_weights=False)
    return net.state_dict()


def _read_state_dict(path: str, expected: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"cannot read weights file {path} (expected '{expected}'): "
                        f"{unreadable_reason(Path(path), e)}") from None
    if not isinstance(state, dict):
        raise EvalError(f"{path} does not hold a state dict (expected '{expected}')")
    return state


@dataclass
class Stats:
    """Gaussian statistics of a folder's features; `size` is the (W, H) images were scored at."""
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    size: Optional[Tuple[int, int]] = None


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: List[Path], size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img, resized = load_rgb(self.files[i], self.size)
        return img, resized


def features_of(files: List[Path], feature_fn: FeatureFn, size, batch_size: int = 50,
                device="cpu", num_workers: int = 0, desc: str = "features") -> np.ndarray:
    """(N, D) float64 features of `files`, each brought to `size` = (W, H) by the size policy."""
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(_Images(files, size), batch_size=max(1, batch_size),
                                         shuffle=False, **worker_options(num_workers))
    out, resized = [], 0
    with torch.no_grad():
        for batch, was_resized in iter_user_errors_clean(tqdm(loader, desc=desc, leave=False, file=sys.stderr,
                                                              disable=not sys.stderr.isatty())):
            resized += int(was_resized.sum())
            f = feature_fn(batch.to(device))
            out.append(f.reshape(len(batch), -1).double().cpu().numpy())
    note_resized(resized, len(files), f"images of {Path(files[0]).parent}")
    return np.concatenate(out)


def statistics(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features, as pytorch-fid computes them."""
    if len(feats) < 2:
        raise EvalError("FID needs at least 2 images per folder (a covariance of 1 image is undefined)")
    if len(feats) <= feats.shape[1]:
        print(f"note: {len(feats)} images for {feats.shape[1]} features: the covariance is singular "
              "and FID is biased (the paper's protocol uses thousands of images)", file=sys.stderr)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's (numerically stabilized) Frechet distance between two Gaussians.

    Where its matrix square root goes complex (singular covariances: fewer images than features),
    the trace term comes from the symmetric form instead (`trace_sqrt_product`), which is real and
    stable for any positive semi-definite pair; such an FID is still biased by the few images."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise EvalError(f"feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]} (statistics made with other --dims?)")
    if sigma1.shape != (mu1.shape[0],) * 2 or sigma2.shape != sigma1.shape:
        raise EvalError(f"covariance shapes {sigma1.shape} and {sigma2.shape} do not match {mu1.shape[0]} features")
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # scipy: `disp` deprecation, singular-matrix notes
        try:
            return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
        except ValueError:  # "Imaginary component ...": sqrtm of a singular product went complex
            pass
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr sqrt(S1 S2) for positive semi-definite S1, S2, as the sum of the square roots of the
    eigenvalues of the symmetric matrix sqrt(S1) S2 sqrt(S1) (the same eigenvalues as S1 S2, but
    computed by a symmetric solver, so they stay real). Eigenvalues within rounding of zero count as
    zero: a square root would turn their 1e-16 into 1e-8."""
    def psd_eigenvalues(m):
        w, v = np.linalg.eigh((m + m.T) / 2.0)
        w[w <= len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max()), 1e-300)] = 0.0
        return w, v

    w, v = psd_eigenvalues(np.asarray(sigma1, dtype=np.float64))
    root1 = (v * np.sqrt(w)) @ v.T
    inner, _ = psd_eigenvalues(root1 @ np.asarray(sigma2, dtype=np.float64) @ root1)
    return float(np.sqrt(inner).sum())


# ---------------------------------------------------------------------------------- npz stats
def save_stats(path, stats: Stats, fingerprint: str = "", feature_id: str = "") -> None:
    """Write stats atomically: mu, sigma (the pytorch-fid keys) + what they were made from."""
    size = np.array(stats.size if stats.size else (0, 0), dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=stats.num_images,
                                          size=size, fingerprint=fingerprint, feature_id=feature_id), "wb")


def load_stats(path) -> Tuple[Stats, str, str]:
    """(stats, fingerprint, feature_id) from an `.npz` (ours, or pytorch-fid's mu/sigma only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if not head.startswith(b"PK"):
            what = ("an empty file" if not head else "a single .npy array" if head == b"\x93NUMPY"
                    else "another format")
            raise EvalError(f"{path} is not an .npz statistics file ({what}); expected one written by --save-stats "
                            "or pytorch-fid")
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise EvalError(f"{path} is not a statistics file (needs arrays 'mu' and 'sigma')")
            size = tuple(int(v) for v in f["size"]) if "size" in f else (0, 0)
            mu, sigma = np.asarray(f["mu"], dtype=np.float64), np.asarray(f["sigma"], dtype=np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
                raise EvalError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise EvalError(f"{path}: its statistics hold NaN or Inf (a damaged file, or features of broken "
                                "images); recompute it with --save-stats")
            stats = Stats(mu, sigma, int(f["num_images"]) if "num_images" in f else -1,
                          size if size != (0, 0) else None)
            return stats, str(f["fingerprint"]) if "fingerprint" in f else "", \
                str(f["feature_id"]) if "feature_id" in f else ""
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"cannot read statistics file {path}: {e}") from None


def load_npz_checked(path: Path, feature_id: str) -> Stats:
    """Stats from an `.npz`, refusing ones made with other features than the current ones."""
    stats, _, made_with = load_stats(path)
    if made_with and feature_id and made_with != feature_id:
        raise EvalError(f"{path} was computed with features '{made_with}', not the current '{feature_id}'")
    return stats


def compute_fid(samples, gt, feature_fn: Optional[FeatureFn] = None, weights: Optional[str] = None,
                dims: int = 2048, batch_size: int = 50, device=None, num_workers: int = 0,
                save_stats_path=None, paired: bool = True) -> float:
    """FID between `samples` and `gt`; each is an image folder or an `.npz` of statistics.

    feature_fn: callable (B,3,H,W) in [0,1] on `device` -> (B, D); default pytorch-fid's Inception
    with `weights` (path, None = torch hub cache, 'random' = tests). An `identity` attribute on it
    keys the cache. paired: two folders must hold the same file names (the released protocol
    scores one sample per ground-truth label map). save_stats_path: cache of the ground-truth
    statistics, reused while the folder fingerprint and the features match, else recomputed.
    """
    samples, gt = Path(samples), Path(gt)
    is_npz = [p.suffix.lower() == ".npz" for p in (samples, gt)]
    for p, npz in zip((samples, gt), is_npz):
        if npz and not p.is_file():
            raise EvalError(f"statistics file not found: {p}")
    listings = {p: list_images(p, "image folder") for p, npz in zip((samples, gt), is_npz) if not npz}
    if paired and len(listings) == 2:
        match_names([(samples, listings[samples]), (gt, listings[gt])])
    if save_stats_path is not None and is_npz[1]:
        raise EvalError("--save-stats needs a ground-truth image folder, not a statistics file")

    device = default_device(device)
    if listings and feature_fn is None:
        feature_fn = InceptionFeatures(inception_weights(weights), dims).to(device)
    feature_id = getattr(feature_fn, "identity", "") if feature_fn is not None else ""

    # Reference size: the ground truth's (first image, or the size stored with its statistics).
    loaded = {p: load_npz_checked(p, feature_id) for p, npz in zip((samples, gt), is_npz) if npz}
    gt_stats = loaded.get(gt)
    if gt_stats is not None:
        size = gt_stats.size
    else:
        size = image_size(listings[gt][min(listings[gt])])
    if size is None and not is_npz[0]:
        size = image_size(listings[samples][min(listings[samples])])

    def folder_stats(folder: Path, desc: str) -> Stats:
        files = [listings[folder][n] for n in sorted(listings[folder])]
        mu, sigma = statistics(features_of(files, feature_fn, size, batch_size, device, num_workers, desc))
        return Stats(mu, sigma, len(files), size)

    if gt_stats is None:
        files = list(listings[gt].values())
        fingerprint = folder_fingerprint(files) + f"/{feature_id}/{size[0]}x{size[1]}"
        cache = Path(save_stats_path) if save_stats_path is not None else None
        if cache is not None and cache.is_file() and feature_id:
            cached, cached_fp, _ = load_stats(cache)
            if cached_fp == fingerprint:
                gt_stats = cached
                print(f"using cached ground-truth statistics {cache}", file=sys.stderr)
            else:
                print(f"cached statistics {cache} are stale (folder or weights changed); recomputing",
                      file=sys.stderr)
        if gt_stats is None:
            gt_stats = folder_stats(gt, "ground truth")
            if cache is not None:
                save_stats(cache, gt_stats, fingerprint, feature_id)
    sample_stats = loaded[samples] if is_npz[0] else folder_stats(samples, "samples")
    return frechet_distance(sample_stats.mu, sample_stats.sigma, gt_stats.mu, gt_stats.sigma)
