"""Scores for folders of samples: FID (fidelity), LPIPS diversity, mIoU (label correspondence).

Subpackages `fid`, `lpips`, `miou` are libraries with a CLI each (`python -m evaluations.fid`);
`evaluations.report` runs whichever apply to a sampler results folder. See evaluations/README.md.
"""
