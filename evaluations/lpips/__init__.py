"""LPIPS diversity: mean pairwise perceptual distance among K samples of the same label map.

For every label name, LPIPS is averaged over the K(K-1)/2 pairs of its samples
(`samples_0/<name>.png` ... `samples_{K-1}/<name>.png`), then averaged over names -- the
released protocol (AlexNet, K = 10). The metric is the `lpips` package's; only the backbone
weights are loaded here, from a local torchvision state dict, so that nothing is downloaded.
"""
from __future__ import annotations

import sys
import warnings
from itertools import combinations
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from evaluations.common import (
    EvalError, default_device, list_images, load_rgb, match_names, note_resized, resolve_weights,
)
from scdm.checkpoint import unreadable_reason
from scdm.data.datasets import iter_user_errors_clean
from scdm.runtime.stop_signals import worker_options

DistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B,3,H,W) in [-1,1] x2 -> (B,)
NETS = ("alex", "vgg", "squeeze")


def _torchvision_weights(net: str):
    import torchvision.models as tvm
    return {"alex": tvm.AlexNet_Weights, "vgg": tvm.VGG16_Weights,
            "squeeze": tvm.SqueezeNet1_1_Weights}[net].IMAGENET1K_V1


def backbone_file(net: str = "alex") -> str:
    """File name torchvision caches the ImageNet backbone under (alex: alexnet-owt-7be5be79.pth)."""
    return _torchvision_weights(net).url.rsplit("/", 1)[-1]


def backbone_weights(weights: Optional[str] = None, net: str = "alex", flag: str = "--weights") -> str:
    """Path of the backbone state dict (`flag`, else the torch hub cache), or 'random'."""
    w = _torchvision_weights(net)
    return resolve_weights(weights, backbone_file(net), f"torchvision {net} (LPIPS backbone)", flag, w.url)


def lpips_model(weights: str, net: str = "alex", device="cpu") -> torch.nn.Module:
    """lpips.LPIPS (v0.1, its calibrated linear layers shipped in the package) whose backbone is
    loaded from `weights` (a torchvision state dict) or left random ('random', tests only)."""
    import lpips
    if net not in NETS:
        raise EvalError(f"--net {net}: choose one of {', '.join(NETS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # 'random' is the same network in every run
            model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if weights != "random":
        model.net.load_state_dict(_backbone_state(weights, model.net, net))
    return model.eval().to(device)


def _backbone_state(path: str, trunk: torch.nn.Module, net: str) -> dict:
    """Rename torchvision's `features.<i>.*` to lpips' `slice<k>.<i>.*` (lpips cuts `features` into slices)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"cannot read weights file {path} (expected '{backbone_file(net)}'): "
                        f"{unreadable_reason(Path(path), e)}") from None
    mapped = {}
    for key in trunk.state_dict():
        slice_name, rest = key.split(".", 1)
        src = f"features.{rest}"
        if not isinstance(state, dict) or src not in state:
            raise EvalError(f"{path} is not the torchvision {net} state dict '{backbone_file(net)}' "
                            f"(no '{src}')")
        mapped[key] = state[src]
    return mapped


def find_sample_sets(results_dir, num_sets: Optional[int] = None) -> List[Path]:
    """`samples_0 ... samples_{K-1}` of a results folder (set 0 may be `samples/` instead).
    K defaults to the number of consecutive sets found from 0."""
    results = Path(results_dir)
    if not results.is_dir():
        raise EvalError(f"results folder not found: {results}")

    def set_dir(k: int) -> Path:
        p = results / f"samples_{k}"
        return results / "samples" if k == 0 and not p.is_dir() and (results / "samples").is_dir() else p

    if num_sets is None:
        num_sets = 0
        while set_dir(num_sets).is_dir():
            num_sets += 1
        later = sorted(p.name for p in results.glob("samples_*") if p.is_dir() and p.name[8:].isdigit()
                       and int(p.name[8:]) > num_sets)
        if later:
            raise EvalError(f"{results} has {', '.join(later)} but no samples_{num_sets}: the sets must be "
                            f"consecutive from 0 (or pass --num_sets {num_sets} to score only the first {num_sets})")
    elif num_sets < 1:
        raise EvalError(f"--num_sets {num_sets}: must be at least 1")
    dirs = [set_dir(k) for k in range(num_sets)]
    missing = [d.name for d in dirs if not d.is_dir()]
    if missing:
        raise EvalError(f"--num_sets {num_sets}: {results} lacks {', '.join(missing)}")
    return dirs


class _SameName(torch.utils.data.Dataset):
    """Item i: the K images named names[i], stacked at the size of set 0's image (size policy)."""

    def __init__(self, names: List[str], listings: List[dict]):
        self.names, self.listings = names, listings

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        first, _ = load_rgb(self.listings[0][self.names[i]])
        size = (first.shape[2], first.shape[1])
        rest = [load_rgb(files[self.names[i]], size) for files in self.listings[1:]]
        return torch.stack([first] + [t for t, _ in rest]), sum(int(r) for _, r in rest)


def lpips_diversity(sets: Sequence[Path], distance_fn: Optional[DistanceFn] = None,
                    weights: Optional[str] = None, net: str = "alex", batch_size: int = 50,
                    device=None, num_workers: int = 0) -> dict:
    """Mean over names of the mean pairwise distance among the K sets' images of that name.

    distance_fn: (a, b) in [-1, 1] -> (B,) distances; default lpips.LPIPS with `weights`
    (None = torch hub cache, 'random' = tests). batch_size: image pairs per network call.
    Returns {'lpips', 'num_sets', 'num_names', 'num_pairs', 'per_name'}.
    """
    from tqdm import tqdm
    if len(sets) < 2:
        raise EvalError(f"LPIPS diversity needs at least 2 sample sets, found {len(sets)} "
                        f"({', '.join(str(s) for s in sets) or 'none'}); sample with --num_sets K")
    listings = [list_images(s, "sample folder") for s in sets]
    names = match_names(list(zip(sets, listings)))
    device = default_device(device)
    if distance_fn is None:
        model = lpips_model(backbone_weights(weights, net), net, device)
        distance_fn = lambda a, b: model(a, b).flatten()  # noqa: E731
    pairs = list(combinations(range(len(sets)), 2))
    per_name = np.zeros(len(names))
    loader = torch.utils.data.DataLoader(_SameName(names, listings), batch_size=None,
                                         **worker_options(num_workers))
    buf_a, buf_b, buf_idx, resized = [], [], [], 0

    def flush():
        if buf_a:
            a = torch.stack(buf_a).to(device)
            try:
                with torch.no_grad():
                    d = distance_fn(a, torch.stack(buf_b).to(device))
            except RuntimeError as e:  # images below the network's minimum size, out of memory
                raise EvalError(f"LPIPS failed on {len(a)} image pairs of {a.shape[3]}x{a.shape[2]}: "
                                f"{str(e).splitlines()[0]} (AlexNet needs at least 32x32; for memory "
                                "lower -b)") from None
            np.add.at(per_name, buf_idx, d.double().cpu().numpy().reshape(-1))
            for buf in (buf_a, buf_b, buf_idx):
                buf.clear()

    for n, (imgs, r) in enumerate(iter_user_errors_clean(tqdm(loader, desc="lpips", leave=False, file=sys.stderr,
                                                              disable=not sys.stderr.isatty()))):
        resized += int(r)
        imgs = imgs * 2 - 1
        if buf_a and buf_a[0].shape != imgs.shape[1:]:
            flush()  # label maps of another size: a batch holds one size
        for i, j in pairs:
            buf_a.append(imgs[i])
            buf_b.append(imgs[j])
            buf_idx.append(n)
            if len(buf_a) >= batch_size:
                flush()
    flush()
    note_resized(resized, len(names) * (len(sets) - 1), "samples of sets 1..K-1")
    per_name /= len(pairs)
    return {"lpips": float(per_name.mean()), "num_sets": len(sets), "num_names": len(names),
            "num_pairs": len(pairs), "per_name": dict(zip(names, per_name.tolist()))}
