"""SCDMPipeline: a checkpoint and a label map in (array, PNG of ids, palette PNG, raw ids), PIL images out."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from scdm.data.dataset_layouts import COCO_STUFF_CLASSES, COCO_UNUSED_THING_IDS, LAYOUTS, display_names, resize_ids
from scdm.runtime.errors import UserError
from scdm.data.palettes import ids_from_colors, palette
from scdm.pipeline import MASK_ID, LabelMapResized, SCDMPipeline
from scdm.diffusion.sampling import SAMPLERS
from conftest import auto_precision_here
from tiny_run import make_tiny_run

STEPS = 3


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return SCDMPipeline.from_checkpoint(make_tiny_run(tmp_path_factory.mktemp("run")))


def label_map(seed=0, size=16, classes=4):
    ids = np.zeros((size, size), dtype=np.int64)
    ids[: size // 2] = 1
    ids[:, : size // 3] = 2
    ids[size - 4:, size - 5:] = 3
    return np.roll(ids, seed, axis=1) % classes


def pixels(images):
    return [np.asarray(im) for im in images]


def test_array_and_png_path_give_identical_images(pipe, tmp_path):
    ids = label_map()
    Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "map.png")
    a = pipe(ids, num_samples=2, steps=STEPS, seed=7, names=["map"])
    b = pipe(str(tmp_path / "map.png"), num_samples=2, steps=STEPS, seed=7)  # a path is keyed on its file name
    assert len(a) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in a)
    assert all((x == y).all() for x, y in zip(pixels(a), pixels(b)))
    assert not (pixels(a)[0] == pixels(a)[1]).all()  # the two samples have their own noise
    c = pipe(ids, num_samples=1, steps=STEPS, seed=8)
    assert not (pixels(c)[0] == pixels(a)[0]).all()


def test_palette_png_and_batches(pipe, tmp_path):
    ids = label_map(3)
    colour = Image.fromarray(np.asarray(pipe.colorize(ids)))
    colour.save(tmp_path / "colour.png")
    want = pixels(pipe(ids, steps=STEPS, seed=1, names=["x"]))
    assert (pixels(pipe(tmp_path / "colour.png", steps=STEPS, seed=1, names=["x"]))[0] == want[0]).all()
    # a batch gives each map the image it gets alone (per-name seeds), whatever the batch size
    batch = pipe([label_map(0), ids], steps=STEPS, seed=1, names=["y", "x"], batch_size=2)
    assert len(batch) == 2 and (np.asarray(batch[1][0]) == want[0]).all()
    stacked = pipe(np.stack([label_map(0), ids]), steps=STEPS, seed=1, names=["y", "x"], batch_size=1)
    assert all((np.asarray(p[0]) == np.asarray(q[0])).all() for p, q in zip(batch, stacked))


def test_wrong_size_is_resized_with_a_warning(pipe):
    small = label_map(size=8)
    with pytest.warns(LabelMapResized, match="8x8; resized to the model's 16x16"):
        got = pipe(small, steps=STEPS, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = pipe(resize_ids(small, (16, 16)), steps=STEPS, seed=2)
    assert (np.asarray(got[0]) == np.asarray(want[0])).all()


def test_bad_maps_are_user_errors(pipe, tmp_path):
    with pytest.raises(UserError, match=r"ids \[4, 9\] outside 0..3"):
        pipe.read_label_map(np.array([[0, 4], [9, 1]]))
    with pytest.raises(UserError, match="colours outside the palette"):
        pipe.read_label_map(Image.new("RGB", (16, 16), (1, 2, 3)))
    with pytest.raises(UserError, match="does not exist"):
        pipe.read_label_map(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read label map"):
        pipe.read_label_map(tmp_path / "junk.png")
    with pytest.raises(UserError, match="steps=0"):
        pipe(label_map(), steps=0)
    with pytest.raises(UserError, match="sampler="):
        pipe(label_map(), steps=2, sampler="nope")


def test_model_input_mask_and_unlabeled(pipe):
    ids = label_map()
    ids[0, :5] = MASK_ID
    y = pipe.model_input([ids]).numpy()[0]
    expect = np.zeros((4, 16, 16), dtype=np.float32)
    for k in range(4):
        expect[k] = (ids == k)
    assert (y == expect).all() and (y[:, 0, :5] == 0).all()
    y0 = pipe.model_input([ids], unlabeled_to_zero=True).numpy()[0]
    assert (y0[3] == 0).all() and (y0[:3] == expect[:3]).all()
    picture = np.asarray(pipe.colorize(ids))
    assert (picture[0, 0] == 128).all() and (picture[15, 15] == 0).all()  # [MASK] grey, unlabeled black


def test_raw_ids_follow_the_layout(tmp_path):
    pipe = SCDMPipeline.from_checkpoint(make_tiny_run(tmp_path, dataset_mode="ade20k", num_classes=151,
                                                      unlabeled_id=150))
    raw = np.array([[0, 1], [150, 7]])
    got = pipe.read_label_map(raw, raw_ids=True, resize=False)
    assert got.tolist() == [[150, 0], [149, 6]]
    with pytest.raises(UserError, match="contains id 151"):
        pipe.read_label_map(np.array([[151, 1], [1, 1]]), raw_ids=True, resize=False)
    assert pipe.class_names[0] == "wall" and pipe.class_names[150] == "unlabeled"


def test_class_name_facts():
    import torchvision.models._meta as meta  # COCO detection names, with N/A at the ids COCO leaves unused
    coco = meta._COCO_CATEGORIES[1:]
    assert len(COCO_STUFF_CLASSES) == LAYOUTS["coco"].num_classes == 183
    assert len(set(COCO_STUFF_CLASSES)) == 183 and COCO_STUFF_CLASSES[182] == "unlabeled"
    assert [i for i, n in enumerate(coco) if n == "N/A"] == list(COCO_UNUSED_THING_IDS[:-1])
    assert all(COCO_STUFF_CLASSES[i] == n for i, n in enumerate(coco) if n != "N/A")
    assert COCO_STUFF_CLASSES[90] == "hair brush" and COCO_STUFF_CLASSES[91] == "banner"
    assert COCO_STUFF_CLASSES[181] == "wood"
    names = display_names("folder", 5, None, unlabeled_id=4)
    assert names == ("class 0", "class 1", "class 2", "class 3", "unlabeled")
    assert display_names("celeba", 19)[13] == "hair"
    colors = palette("coco", 183, 182)
    ids = np.arange(183).reshape(1, -1)
    assert (ids_from_colors(colors[ids], colors) == ids).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_of_the_cli(pipe, sampler):
    a = pipe(label_map(), steps=2, seed=3, sampler=sampler)
    b = pipe(label_map(), steps=2, seed=3, sampler=sampler)
    assert (np.asarray(a[0]) == np.asarray(b[0])).all() and np.asarray(a[0]).std() > 0
    # extrapolation by default: the released 0.8, none for the multistep solver
    default = 0.0 if sampler.startswith("dpm") else 0.8
    c = pipe(label_map(), steps=2, seed=3, sampler=sampler, extrapolation=default)
    assert (np.asarray(a[0]) == np.asarray(c[0])).all()


def test_instance_map_gives_the_edge_channel(tmp_path):
    from scdm.data.conditioning import instance_edges
    pipe = SCDMPipeline.from_checkpoint(make_tiny_run(tmp_path, no_instance=False))
    ids = label_map()
    inst = np.arange(256).reshape(16, 16) // 37
    y = pipe.model_input([ids], [inst]).numpy()[0]
    assert (y[4] == instance_edges(torch.as_tensor(inst)).numpy()).all()
    y_default = pipe.model_input([ids]).numpy()[0]  # no instance map: class borders are the edges
    assert (y_default[4] == instance_edges(torch.as_tensor(ids)).numpy()).all()
    images = pipe(ids, steps=2, instance=inst)
    assert images[0].size == (16, 16)


def test_diffusers_habits(tmp_path):
    """from_pretrained (a file or a run folder), pipe.to(device), and an output with .images and what made
    them; the list it always was keeps working."""
    from scdm.runtime.fileio import save_torch
    from scdm.checkpoint import newest_checkpoint
    from scdm.pipeline import SCDMPipeline
    from tiny_run import make_tiny_run
    run = tmp_path / "run"
    run.mkdir()
    model = make_tiny_run(run)
    save_torch(torch.load(model), run / "model000004.pt")
    save_torch(torch.load(model), run / "ema_0.99_000004.pt")
    assert newest_checkpoint(run) == run / "ema_0.99_000004.pt"
    with pytest.warns(UserWarning, match="averages 4 steps"):  # a young EMA file is said, as the sampler says it
        pipe = SCDMPipeline.from_pretrained(run).to("cpu")
    assert pipe.loaded.model_path == run / "ema_0.99_000004.pt" and pipe.device == torch.device("cpu")
    out = pipe(label_map(), num_samples=2, steps=STEPS, seed=3, names=["m"])
    assert isinstance(out, list) and len(out) == 2 and out.images == list(out)
    assert out.names == ["m"] and len(out.seeds) == 2 and out.seeds[0] != out.seeds[1] and out.unlabeled_to_zero is True
    same = SCDMPipeline.from_pretrained(model)(label_map(), num_samples=2, steps=STEPS, seed=3, names=["m"])
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(out, same))
    with pytest.raises(UserError, match="is a folder without checkpoints"):
        SCDMPipeline.from_pretrained(tmp_path)


def test_precision_defaults_to_auto(pipe, tmp_path):
    """The pipeline runs what fits the device unless told: bf16 on a CPU with native bf16, else fp32
    (the tiny run has use_fp16 False); an explicit precision is kept, and the note says what runs."""
    assert pipe.device.type == "cpu" and pipe.precision == auto_precision_here()
    assert pipe.precision_note.startswith(f"precision {pipe.precision} (--precision auto: this CPU ")
    explicit = SCDMPipeline(pipe.loaded, device="cpu", precision="fp32")
    assert explicit.precision == "fp32" and explicit.precision_note == "precision fp32"
    with pytest.raises(ValueError, match="--precision 'fp8': expected one of"):
        SCDMPipeline(pipe.loaded, device="cpu", precision="fp8")
