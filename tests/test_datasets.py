"""scdm.data.datasets on tiny fake trees of every layout: remapping, edges, transforms, sharding,
name matching, and one clear error per kind of bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from scdm.data import dataset_layouts as L
from scdm.data import datasets as D
from scdm.data.conditioning import Conditioning, instance_edges, label_to_model_input
from scdm.data.dataset_layouts import DatasetError, dataset_info
from scdm.data.datasets import build_dataset, load_data, transform
from scdm.runtime.errors import UserError

H, W = 12, 16  # stored file size (width 16, height 12)


def save(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path)


def rand_image(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def blocks(seed, values, shape=(H, W)):
    """A label map of 4x4 blocks with ids drawn from `values`."""
    rng = np.random.default_rng(seed)
    small = rng.choice(np.asarray(values), size=(shape[0] // 4, shape[1] // 4))
    return np.kron(small, np.ones((4, 4), dtype=small.dtype))


def make_ade(root, n=3, split="training"):
    raws = []
    for i in range(n):
        raw = blocks(i, [0, 1, 2, 150]).astype(np.uint8)
        raw[:4, :4] = 0
        raw[-4:, -4:] = 150
        save(f"{root}/images/{split}/ADE_{i:03d}.jpg", rand_image(i))
        save(f"{root}/annotations/{split}/ADE_{i:03d}.png", raw)
        raws.append(raw)
    return raws


def make_coco(root, n=3, split="train"):
    for i in range(n):
        raw = blocks(i, [0, 5, 181, 255]).astype(np.uint8)
        raw[0, 0] = 255
        save(f"{root}/{split}_img/{i:012d}.jpg", rand_image(i))
        save(f"{root}/{split}_label/{i:012d}.png", raw)
        save(f"{root}/{split}_inst/{i:012d}.png", blocks(i + 7, [0, 1, 2, 3]).astype(np.uint8))


def make_celeba(root, n=3, split="train"):
    for i in range(n):
        save(f"{root}/{split}/images/{i}.jpg", rand_image(i))
        save(f"{root}/{split}/labels/{i}.png", blocks(i, list(range(19))).astype(np.uint8))


def make_cityscapes(root, split="train"):
    names = [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bonn", "bonn_000000_000019")]
    for i, (city, key) in enumerate(names):
        save(f"{root}/leftImg8bit/{split}/{city}/{key}_leftImg8bit.png", rand_image(i))
        save(f"{root}/gtFine/{split}/{city}/{key}_gtFine_labelIds.png", blocks(i, [7, 26, 33]).astype(np.uint8))
        inst = np.full((H, W), 7, dtype=np.uint16)
        inst[:, :8] = 26001  # two cars side by side: only their instance ids differ
        inst[:, 8:] = 26002
        save(f"{root}/gtFine/{split}/{city}/{key}_gtFine_instanceIds.png", inst)
        save(f"{root}/gtFine/{split}/{city}/{key}_gtFine_color.png", rand_image(i))  # must be ignored
    return [k for _, k in names]


def make_folder(root, n=4, split="train", num_classes=5, instances=True, meta=True):
    for i in range(n):
        save(f"{root}/{split}/images/img{i}.png", rand_image(i))
        save(f"{root}/{split}/labels/img{i}.png", blocks(i, list(range(num_classes))).astype(np.uint8))
        if instances:
            save(f"{root}/{split}/instances/img{i}.png", blocks(i + 3, [1, 2, 3]).astype(np.uint8))
    if meta:
        with open(f"{root}/dataset.json", "w") as f:
            json.dump({"num_classes": num_classes, "unlabeled_id": None}, f)


# ---------------------------------------------------------------------------------------------
# Remapping and layouts


def test_ade20k_remap_and_shapes(tmp_path):
    raws = make_ade(tmp_path, split="validation")
    ds = build_dataset("ade20k", str(tmp_path), image_size=8, is_train=False)
    assert len(ds) == 3 and ds.info == L.DatasetInfo(151, 150, False)
    for i in range(3):
        image, cond = ds[i]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
        assert set(cond) == {"label", "label_ori", "path"}
        raw = np.asarray(Image.fromarray(raws[i]).resize((8, 8), Image.NEAREST)).astype(np.float32)
        np.testing.assert_array_equal(cond["label_ori"][0].numpy(), raw)
        expect = np.where(raw == 0, 150, raw - 1)
        np.testing.assert_array_equal(cond["label"][0].numpy(), expect)
        assert cond["label"][0, 0, 0] == 150 and cond["label"][0, -1, -1] == 149
        assert cond["path"].endswith(f"ADE_{i:03d}.jpg")


def test_coco_remap_and_instances(tmp_path):
    make_coco(tmp_path, split="val")
    ds = build_dataset("coco", str(tmp_path), image_size=16, is_train=False)
    image, cond = ds[0]
    assert cond["instance"].shape == (1, 16, 16)
    ori = cond["label_ori"][0]
    assert (ori == 255).any()
    np.testing.assert_array_equal(cond["label"][0].numpy(), np.where(ori.numpy() == 255, 182, ori.numpy()))
    assert dataset_info("coco") == L.DatasetInfo(183, 182, True)


def test_celeba_label_doubles_as_instance(tmp_path):
    make_celeba(tmp_path, split="test")
    ds = build_dataset("celeba", str(tmp_path), image_size=16, is_train=False)
    _, cond = ds[1]
    assert torch.equal(cond["instance"], cond["label_ori"]) and torch.equal(cond["label"], cond["label_ori"])
    assert dataset_info("celeba") == L.DatasetInfo(19, None, True)


def test_cityscapes_suffixes_cities_and_16bit_instances(tmp_path):
    keys = make_cityscapes(tmp_path, split="val")
    ds = build_dataset("cityscapes", str(tmp_path), image_size=16, is_train=False)
    assert [r.key for r in ds.records] == sorted(keys)
    _, cond = ds[0]
    inst = cond["instance"][0]
    assert set(inst.unique().tolist()) == {26001.0, 26002.0}  # 16-bit ids kept, not clipped to 255
    edges = instance_edges(cond["instance"])[0]
    assert edges[:, 7].all() and edges[:, 8].all() and edges.sum() == 2 * 16
    assert dataset_info("cityscapes") == L.DatasetInfo(35, None, True)


def test_folder_layout_json_and_flag_override(tmp_path):
    make_folder(tmp_path, num_classes=5)
    assert dataset_info("folder", str(tmp_path)) == L.DatasetInfo(5, None, True)
    assert dataset_info("folder", str(tmp_path), num_classes=7, unlabeled_id=6) == L.DatasetInfo(7, 6, True)
    assert dataset_info("folder", str(tmp_path), -1, -1) == L.DatasetInfo(5, None, True)  # -1: not given
    ds = build_dataset("folder", str(tmp_path), image_size=16, is_train=True)
    _, cond = ds[0]
    assert set(cond) == {"label", "label_ori", "instance", "path"}


def test_folder_without_instances(tmp_path):
    make_folder(tmp_path, instances=False)
    info = dataset_info("folder", str(tmp_path))
    assert not info.has_instance
    _, cond = build_dataset("folder", str(tmp_path), 16, True)[0]
    assert "instance" not in cond


def test_name_matching_by_stem_not_position(tmp_path):
    # Sorted paths would pair a with b: labels/b.png sorts before labels/z/a.png.
    for name, value in (("a", 1), ("b", 2)):
        save(f"{tmp_path}/train/images/{name}.jpg", rand_image(value))
    save(f"{tmp_path}/train/labels/z/a.png", np.full((H, W), 1, np.uint8))
    save(f"{tmp_path}/train/labels/b.png", np.full((H, W), 2, np.uint8))
    ds = build_dataset("folder", str(tmp_path), 8, True, num_classes=3)
    for i, value in enumerate((1, 2)):
        _, cond = ds[i]
        assert (cond["label"] == value).all()


# ---------------------------------------------------------------------------------------------
# Edges and model input


def brute_force_edges(inst):
    h, w = inst.shape
    out = np.zeros((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and inst[yy, xx] != inst[y, x]:
                    out[y, x] = 1
    return out


def test_instance_edges_match_brute_force():
    rng = np.random.default_rng(0)
    inst = rng.integers(0, 3, (2, 1, 9, 11)) * 1000 + rng.integers(0, 2, (2, 1, 9, 11))
    inst[0, 0, :4, :5] = 5  # a flat area with no edges inside
    edges = instance_edges(torch.from_numpy(inst).float())
    assert edges.shape == inst.shape and edges.dtype == torch.float32
    for b in range(2):
        np.testing.assert_array_equal(edges[b, 0].numpy(), brute_force_edges(inst[b, 0]))


def test_label_to_model_input():
    label = torch.tensor([[[[0, 1], [2, 2]]]], dtype=torch.float32)
    instance = torch.tensor([[[[1, 1], [2, 2]]]], dtype=torch.float32)
    cond = {"label": label, "instance": instance}
    y = label_to_model_input(cond, num_classes=3, no_instance=False)
    assert y.shape == (1, 4, 2, 2)
    np.testing.assert_array_equal(y[0, :3].argmax(0).numpy(), label[0, 0].numpy())
    assert (y[:, :3].sum(1) == 1).all()
    assert (y[0, 3] == 1).all()  # every pixel touches the other instance
    assert label_to_model_input(cond, 3, no_instance=True).shape == (1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"label value 2 is outside 0..1 \(num_classes=2\)"):
        label_to_model_input(cond, 2, True)
    with pytest.raises(ValueError, match="no_instance"):
        label_to_model_input({"label": label}, 3, False)


def test_conditioning_mask_and_dropout():
    """unlabeled_to_zero turns the unlabeled class into the all-zero [MASK] vector; dropout zeroes
    whole samples (labels and edges) at the asked rate; the same generator gives the same drops."""
    label = torch.tensor([[[[0, 2], [2, 1]]]], dtype=torch.float32).repeat(4000, 1, 1, 1)
    cond = {"label": label, "instance": label.clone()}
    plain = Conditioning(3, no_instance=False, unlabeled_id=2)
    masked = Conditioning(3, no_instance=False, unlabeled_id=2, unlabeled_to_zero=True)
    y, ym = plain.model_input(cond), masked.model_input(cond)
    assert plain.channels == 4 and y.shape == ym.shape == (4000, 4, 2, 2)
    assert (ym[:, 2] == 0).all() and torch.equal(ym[:, [0, 1, 3]], y[:, [0, 1, 3]])
    assert (ym[0, :3].sum(0) == torch.tensor([[1, 0], [0, 1]])).all()  # [MASK] pixels: all-zero
    dropper = Conditioning(3, no_instance=False, drop_rate=0.25)
    dropped = dropper.drop(y, generator=torch.Generator().manual_seed(0))
    zero_rows = (dropped.flatten(1) == 0).all(1)
    assert torch.equal(dropped[~zero_rows], y[~zero_rows])
    assert abs(zero_rows.float().mean().item() - 0.25) < 0.03  # binomial sd ~0.007
    again = dropper.drop(y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    assert Conditioning(3, True).drop(y) is y
    with pytest.raises(ValueError, match="--drop_rate 1.0"):
        Conditioning(3, True, drop_rate=1.0)


# ---------------------------------------------------------------------------------------------
# Transforms


class FixedRng:
    """randrange -> its largest value (biggest scale, then bottom-right crop); random -> 0 (flip)."""

    def randrange(self, a, b=None):
        return (a - 1) if b is None else (b - 1)

    def random(self):
        return 0.0


def test_train_transform_matches_manual_pipeline():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (128, 256, 3), dtype=np.uint8))
    label = rng.integers(0, 9, (128, 256))
    arr, (lab,) = transform(image, [label], 32, is_train=True, rng=FixedRng())
    smaller = math.ceil(32 / 0.8)  # 40: largest size of the range
    ref = image.resize((128, 64), Image.BOX)  # one 2x pre-shrink (128 >= 80, then 64 < 80)
    ref = ref.resize((80, 40), Image.BICUBIC)
    ref_lab = np.asarray(Image.fromarray(label.astype(np.int32)).resize((80, 40), Image.NEAREST))
    assert smaller == 40
    np.testing.assert_array_equal(arr, np.asarray(ref)[8:40, 48:80][:, ::-1])
    np.testing.assert_array_equal(lab, ref_lab[8:40, 48:80][:, ::-1])


def test_train_transform_random_size_range_and_center_crop():
    image = Image.fromarray(np.zeros((50, 70, 3), np.uint8))
    label = np.zeros((50, 70), np.int64)
    for seed in range(5):
        arr, (lab,) = transform(image, [label], 24, True, rng=__import__("random").Random(seed))
        assert arr.shape == (24, 24, 3) and lab.shape == (24, 24)
    grad = np.tile(np.arange(70), (50, 1))
    _, (lab,) = transform(Image.fromarray(np.zeros((50, 70, 3), np.uint8)), [grad], 50, True,
                          random_crop=False, random_flip=False)
    np.testing.assert_array_equal(lab, grad[:, 10:60])  # no rescale, centered crop


def test_test_transform_is_plain_resize(tmp_path):
    make_folder(tmp_path, n=2, split="test")
    ds = build_dataset("folder", str(tmp_path), image_size=10, is_train=False, random_flip=True)
    a, ca = ds[0]
    b, cb = ds[0]
    assert torch.equal(a, b) and torch.equal(ca["label"], cb["label"])  # no randomness at test time
    raw = np.asarray(Image.open(ds.records[0].label))
    np.testing.assert_array_equal(ca["label"][0].numpy(), np.asarray(Image.fromarray(raw).resize((10, 10), 0)))
    img = Image.open(ds.records[0].image).convert("RGB").resize((10, 10), Image.BICUBIC)
    np.testing.assert_allclose(a.permute(1, 2, 0).numpy(), np.asarray(img) / 127.5 - 1, atol=1e-6)


def test_train_transform_keeps_image_and_labels_aligned(tmp_path):
    from scdm.toy import make_toy_dataset, segment_toy_image
    make_toy_dataset(str(tmp_path), num_train=4, num_test=0, size=48, seed=3)
    ds = build_dataset("folder", str(tmp_path), image_size=32, is_train=True)
    for i in range(4):
        image, cond = ds[i]
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        agree = (segment_toy_image(pixels) == cond["label"][0].numpy()).mean()
        assert agree > 0.9  # only resampled boundary pixels may differ


# ---------------------------------------------------------------------------------------------
# The dataset table


def test_table_facts_and_remapping_rule():
    facts = {m: (L.raw_unlabeled_id(m), L.LAYOUTS[m].unlabeled_class, L.LAYOUTS[m].id_shift)
             for m in ("ade20k", "coco", "celeba", "cityscapes")}
    assert facts == {"ade20k": (0, 150, 1), "coco": (255, 182, 0), "celeba": (None, None, 0),
                     "cityscapes": (0, None, 0)}
    raw = np.array([0, 1, 5, 149, 150, 181, 255])
    np.testing.assert_array_equal(L.remap_labels(raw, "ade20k"), np.where(raw == 0, 150, raw - 1))
    np.testing.assert_array_equal(L.remap_labels(raw, "coco"), np.where(raw == 255, 182, raw))
    for mode in ("celeba", "cityscapes", "folder"):
        np.testing.assert_array_equal(L.remap_labels(raw, mode), raw)
    assert L.remap_labels(np.array([0, 3]), "ade20k", unlabeled_id=7).tolist() == [7, 2]  # --unlabeled_id wins


def test_class_names_match_the_class_counts(tmp_path):
    for mode, layout in L.LAYOUTS.items():
        names = L.class_names(mode)
        assert names is None or len(names) == layout.num_classes == len(set(names)), mode
    assert L.class_names("coco")[0] == "person" and L.class_names("coco")[182] == "unlabeled"
    assert L.class_names("ade20k")[:3] == ("wall", "building", "sky") and L.class_names("ade20k")[150] == "unlabeled"
    assert L.class_names("celeba")[13] == "hair" and L.class_names("cityscapes")[26] == "car"
    from scdm.toy import TOY_CLASSES, make_toy_dataset
    toy = make_toy_dataset(str(tmp_path / "toy"), num_train=1, num_test=0, size=8, seed=0)
    assert L.class_names("folder", toy) == tuple(c.name for c in TOY_CLASSES)
    assert L.raw_unlabeled_id("folder", toy) == 7 and L.raw_unlabeled_id("folder", str(tmp_path)) is None


def test_dataset_errors_are_user_errors():
    assert issubclass(DatasetError, UserError) and issubclass(L.DatasetNotFoundError, FileNotFoundError)


def test_webp_images_are_listed(tmp_path):
    make_folder(tmp_path, n=2)
    os.remove(f"{tmp_path}/train/images/img1.png")
    Image.fromarray(rand_image(1)).save(f"{tmp_path}/train/images/img1.webp", lossless=True)
    ds = build_dataset("folder", str(tmp_path), 8, True)
    assert [os.path.basename(p) for p in ds.paths] == ["img0.png", "img1.webp"] and ds[1][0].shape == (3, 8, 8)
    assert ".webp" in L.IMAGE_EXTENSIONS


def test_read_ids_returns_the_palette(tmp_path):
    pal = Image.fromarray(blocks(1, [1, 4]).astype(np.uint8)).convert("P")
    palette = [v for i in range(256) for v in (i, 255 - i, 7)]
    pal.putpalette(palette)
    pal.save(tmp_path / "p.png")
    ids, got = L.read_ids(tmp_path / "p.png", return_palette=True)
    assert ids.dtype == np.int64 and set(np.unique(ids)) <= {1, 4} and got == palette
    save(f"{tmp_path}/g.png", blocks(0, [2, 3]).astype(np.uint8))
    assert L.read_ids(f"{tmp_path}/g.png", return_palette=True)[1] is None


def test_coco_id_that_would_alias_unlabeled_is_refused(tmp_path):
    make_coco(tmp_path, n=1)
    raw = blocks(0, [0, 5]).astype(np.uint8)
    raw[0, 0] = 182
    save(f"{tmp_path}/train_label/000000000000.png", raw)
    with pytest.raises(DatasetError, match=r"contains id 182; .* is the unlabeled class, which only raw id 255"):
        build_dataset("coco", str(tmp_path), 8, True)[0]


# ---------------------------------------------------------------------------------------------
# Sharding and the training iterator


def test_two_shards_partition_uneven_set(tmp_path):
    make_folder(tmp_path, n=5)
    full = [r.key for r in build_dataset("folder", str(tmp_path), 8, True, shard=0, num_shards=1).records]
    parts = [[r.key for r in build_dataset("folder", str(tmp_path), 8, True, shard=s, num_shards=2).records]
             for s in range(2)]
    assert full == sorted(full) and len(parts[0]) == 3 and len(parts[1]) == 2
    assert build_dataset("folder", str(tmp_path), 8, True, shard=1, num_shards=2).paths[0].endswith("img1.png")
    assert sorted(parts[0] + parts[1]) == full and not set(parts[0]) & set(parts[1])
    with pytest.raises(DatasetError, match="shard=2"):
        build_dataset("folder", str(tmp_path), 8, True, shard=2, num_shards=2)


def test_load_data_is_endless_and_deterministic(tmp_path):
    make_folder(tmp_path, n=3)
    assert D.default_shard() == (0, 1)
    it = load_data(dataset_mode="folder", data_dir=str(tmp_path), batch_size=2, image_size=8,
                   deterministic=True)
    batches = [next(it) for _ in range(4)]  # 1 batch per pass (last one dropped): 4 passes
    images, cond = batches[0]
    assert images.shape == (2, 3, 8, 8) and cond["label"].shape == (2, 1, 8, 8)
    assert cond["instance"].shape == (2, 1, 8, 8) and len(cond["path"]) == 2
    assert all(b[1]["path"] == cond["path"] for b in batches)
    it = load_data(dataset_mode="folder", data_dir=str(tmp_path), batch_size=3, image_size=8, class_cond=False)
    assert set(next(it)[1]) == {"path"}


# ---------------------------------------------------------------------------------------------
# Image conversions


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_are_converted(tmp_path, mode):
    make_folder(tmp_path, n=1)
    path = f"{tmp_path}/train/images/img0.png"
    if mode == "I;16":
        gray = np.random.default_rng(0).integers(0, 65536, (H, W)).astype(np.uint16)
        Image.fromarray(gray).save(path)
        expect = np.rint(gray / 257.0)
    else:
        rgb = Image.open(path).convert("RGB")
        img = rgb.convert(mode)
        img.save(path)
        expect = np.asarray(img.convert("RGB"))[..., 0]
    image = L.read_rgb(path)
    assert image.mode == "RGB" and image.size == (W, H)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], expect)
    ds = build_dataset("folder", str(tmp_path), 16, True)
    assert ds[0][0].shape == (3, 16, 16)


def test_palette_and_16bit_label_maps(tmp_path):
    make_folder(tmp_path, n=2, split="test", num_classes=300, meta=False)
    ids = blocks(0, [0, 3, 299]).astype(np.uint16)
    Image.fromarray(ids).save(f"{tmp_path}/test/labels/img0.png")  # 16-bit
    pal = Image.fromarray(blocks(1, [1, 4]).astype(np.uint8)).convert("P")
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    pal.save(f"{tmp_path}/test/labels/img1.png")
    ds = build_dataset("folder", str(tmp_path), 16, False, num_classes=300)
    assert set(ds[0][1]["label"].unique().tolist()) == {0.0, 3.0, 299.0}
    assert set(ds[1][1]["label"].unique().tolist()) <= {1.0, 4.0}


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_missing_folders(tmp_path):
    for mode in ("ade20k", "folder"):
        with pytest.raises(FileNotFoundError, match="--data_dir .*nope' is not a folder"):
            build_dataset(mode, str(tmp_path / "nope"), 8, True)
    make_ade(tmp_path, split="training")
    with pytest.raises(FileNotFoundError, match=r"images/validation.*does not exist.*annotations"):
        build_dataset("ade20k", str(tmp_path), 8, False)
    make_coco(tmp_path / "c")
    for f in os.listdir(tmp_path / "c" / "train_inst"):
        os.remove(tmp_path / "c" / "train_inst" / f)
    os.rmdir(tmp_path / "c" / "train_inst")
    with pytest.raises(FileNotFoundError, match="train_inst"):
        build_dataset("coco", str(tmp_path / "c"), 8, True)
    with pytest.raises(DatasetError, match="--dataset_mode 'nope'"):
        build_dataset("nope", str(tmp_path), 8, True)


def test_image_without_label_lists_names(tmp_path):
    make_folder(tmp_path, n=8)
    for i in range(7):
        os.remove(f"{tmp_path}/train/labels/img{i}.png")
    listed = r"7 image\(s\) in .*train/images have no label map .* img0, img1, img2, img3, img4, \.\.\."
    with pytest.raises(DatasetError, match=listed):
        build_dataset("folder", str(tmp_path), 8, True)


def test_label_without_image(tmp_path):
    make_folder(tmp_path, n=2)
    save(f"{tmp_path}/train/labels/orphan.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"1 label map\(s\) in .*train/labels have no image .*: orphan"):
        build_dataset("folder", str(tmp_path), 8, True)


def test_duplicate_stems(tmp_path):
    make_folder(tmp_path, n=1)
    save(f"{tmp_path}/train/images/img0.jpg", rand_image(0))
    with pytest.raises(DatasetError, match="share the name stem 'img0'"):
        build_dataset("folder", str(tmp_path), 8, True)


def test_label_out_of_range(tmp_path):
    make_folder(tmp_path, n=2, num_classes=5)
    save(f"{tmp_path}/train/labels/img1.png", np.full((H, W), 9, np.uint8))
    ds = build_dataset("folder", str(tmp_path), 8, True)
    with pytest.raises(DatasetError, match=r"img1.png contains id 9; expected class ids 0..4 \(num_classes=5"):
        ds[1]
    raws = make_ade(tmp_path / "a")
    raws[0][0, 1] = 151  # would alias ADE20K's unlabeled class 150
    save(f"{tmp_path}/a/annotations/training/ADE_000.png", raws[0])
    with pytest.raises(DatasetError, match=r"ADE_000.png contains id 151 \(class 150 after ade20k remapping\)"):
        build_dataset("ade20k", str(tmp_path / "a"), 8, True)[0]
    raws[0][0, 1] = 200
    save(f"{tmp_path}/a/annotations/training/ADE_000.png", raws[0])
    with pytest.raises(DatasetError, match=r"contains id 200 \(class 199 after ade20k remapping\)"):
        build_dataset("ade20k", str(tmp_path / "a"), 8, True)[0]


def test_colour_label_map(tmp_path):
    make_folder(tmp_path, n=1)
    save(f"{tmp_path}/train/labels/img0.png", rand_image(5))
    with pytest.raises(DatasetError, match=r"img0.png is a colour \(RGB\) image; expected a single-channel map"):
        build_dataset("folder", str(tmp_path), 8, True)[0]
    gray = np.repeat(blocks(0, [1, 2])[..., None], 3, axis=2).astype(np.uint8)
    save(f"{tmp_path}/train/labels/img0.png", gray)  # gray stored as RGB is fine
    assert set(build_dataset("folder", str(tmp_path), 8, True)[0][1]["label"].unique().tolist()) <= {1.0, 2.0}


def test_corrupt_and_truncated_files(tmp_path):
    make_folder(tmp_path, n=2)
    with open(f"{tmp_path}/train/images/img0.png", "wb") as f:
        f.write(b"not an image at all")
    path = f"{tmp_path}/train/labels/img1.png"
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    ds = build_dataset("folder", str(tmp_path), 8, True)
    with pytest.raises(DatasetError, match=r"cannot read image .*img0.png"):
        ds[0]
    with pytest.raises(DatasetError, match=r"cannot read label map .*img1.png"):
        ds[1]


def test_label_size_differs_from_image(tmp_path):
    make_folder(tmp_path, n=1)
    save(f"{tmp_path}/train/labels/img0.png", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(DatasetError, match=r"label map .*img0.png is 17x12 but its image .*img0.png is 16x12"):
        build_dataset("folder", str(tmp_path), 8, True)[0]
    make_folder(tmp_path, n=1, split="test")
    small = blocks(0, [1, 2], shape=(4, 4)).astype(np.uint8)  # a deliberately downsampled map (DS benchmark)
    save(f"{tmp_path}/test/labels/img0.png", small)
    save(f"{tmp_path}/test/instances/img0.png", small)
    _, cond = build_dataset("folder", str(tmp_path), 8, False, label_resize=True)[0]
    expect = np.asarray(Image.fromarray(small).resize((W, H), Image.NEAREST).resize((8, 8), Image.NEAREST))
    np.testing.assert_array_equal(cond["label"][0].numpy(), expect)
    np.testing.assert_array_equal(cond["instance"][0].numpy(), expect)


def test_fewer_images_than_a_batch_per_rank(tmp_path):
    make_folder(tmp_path, n=3)
    for shard in (0, 1):  # shard 0 holds 2 images but must fail like shard 1, or DDP would hang
        with pytest.raises(DatasetError, match=r"--batch_size 2 is larger than the 1 image\(s\) of the smallest of 2"):
            load_data(dataset_mode="folder", data_dir=str(tmp_path), batch_size=2, image_size=8, shard=shard,
                      num_shards=2)
    load_data(dataset_mode="folder", data_dir=str(tmp_path), batch_size=3, image_size=8)


def test_folder_needs_num_classes(tmp_path):
    make_folder(tmp_path, n=1, meta=False)
    with pytest.raises(DatasetError, match=r"--num_classes N or write .*dataset.json"):
        build_dataset("folder", str(tmp_path), 8, True)
    with open(f"{tmp_path}/dataset.json", "w") as f:
        json.dump({"num_classes": 4, "unlabeled_id": 4}, f)
    with pytest.raises(DatasetError, match=r"unlabeled_id=4 is outside 0..3"):
        dataset_info("folder", str(tmp_path))


def test_worker_errors_stay_readable(tmp_path):
    """DataLoader re-raises a worker's error with the worker traceback in the message; the
    iterator keeps only our line. (A real failing worker costs torch a 5 s shutdown, so the
    wrapper is built in-process the way the DataLoader builds it.)"""
    from torch._utils import ExceptionWrapper
    make_folder(tmp_path, n=1)
    save(f"{tmp_path}/train/labels/img0.png", np.full((H, W), 9, np.uint8))
    ds = build_dataset("folder", str(tmp_path), 8, True)
    try:
        ds[0]
    except DatasetError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DatasetError) as raw:
        wrapped.reraise()
    assert "Traceback" in str(raw.value)
    clean = D.clean_worker_error(raw.value)
    assert type(clean) is DatasetError and str(clean).startswith("label map") and "Traceback" not in str(clean)


def test_load_data_with_workers(tmp_path):
    make_folder(tmp_path, n=2)
    it = load_data(dataset_mode="folder", data_dir=str(tmp_path), batch_size=2, image_size=8, num_workers=1)
    for _ in range(2):
        images, cond = next(it)
        assert images.shape == (2, 3, 8, 8) and cond["instance"].shape == (2, 1, 8, 8)
