"""Scores for folders of samples: FID (fidelity), LPIPS diversity, mIoU (label correspondence).

Subpackages `fid`, `lpips`, `miou` are libraries with a CLI each (`python -m evaluations.fid`);
`evaluations.report` runs whichever apply to a sampler results folder. `image_stats` is a small
offline stand-in for FID (Frechet distance of simple image statistics) where no Inception weights
exist, as in the quickstart. See evaluations/README.md.
"""
