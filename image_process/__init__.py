"""Noisy-label benchmark trees from a dataset's annotations (thin CLIs over scdm.data.corruptions).

    python -m image_process.downsample --data_dir ADEChallengeData2016 --out_dir ade_ds
    python -m image_process.edge       --data_dir ADEChallengeData2016 --out_dir ade_edge
    python -m image_process.random     --data_dir ADEChallengeData2016 --out_dir ade_random
    python -m image_process.painter    --data_dir ADEChallengeData2016 --out_dir ade_painter

Each writes a complete dataset tree (images hard-linked, noisy annotations as PNG) that the
loader reads as it is, with the same ``--dataset_mode`` (ade20k, coco, celeba, cityscapes, folder).
``python -m image_process.figure`` draws docs/corruptions.png.
"""
