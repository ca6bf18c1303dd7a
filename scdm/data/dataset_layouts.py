"""The one table of dataset facts, and the listing and id-map reading built on it.

The loader, `image_process` and `evaluations` all read datasets; when each kept its own copy of
the folders, the unlabeled ids and the accepted extensions, the copies drifted (a `.webp`
dataset trained but `image_process` skipped it). So every fact about a layout lives in `LAYOUTS`
here and the tools ask this module; it needs only numpy and PIL, so the tools that do not train
do not pay for torch.

Stored (raw) ids become class ids by one rule: `raw_unlabeled_id` -> `unlabeled_class` when
the layout has one, every other id k -> k - `id_shift` (ADE20K: 0 -> 150, k -> k-1; COCO:
255 -> 182; Cityscapes, CelebAMask-HQ and folder: unchanged).
"""
import json
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from ..runtime.errors import UserError

# Every extension PIL decodes that datasets use; the whole project accepts exactly these.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
DATASET_JSON = "dataset.json"
CORRUPTION_FILE = "corruption.json"  # what image_process writes at the root of a noisy tree
MAX_LISTED = 5  # how many offending names an error message lists


def listed(names):
    """The first MAX_LISTED of `names` in their order, then how many more (for an error message)."""
    names = [str(n) for n in names]
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


# Image modes of id maps by the bits one id may take when written back (RGB(A) only when gray).
EIGHT_BIT_MAP_MODES = ("1", "L", "P", "LA", "PA", "RGB", "RGBA")
SIXTEEN_BIT_MAP_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


# ----------------------------------------------------------------------------------------------
# Class names, indexed by class id (after remapping)

# CSAILVision/sceneparsing objectInfo150 (raw id k = row k), first name of each row; class 150 is
# the unlabeled class the remapping adds.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
    "unlabeled",
)
# COCO-Stuff 164k label PNGs (as SPADE/SDM use them): stored id = class id 0..181, 255 = unlabeled
# (class 182 after remapping). Ids 0..90 are the 91 COCO thing ids minus one, the 11 ids COCO never
# annotates included ("street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk",
# "door", "blender", "hair brush"); ids 91..181 are the 91 stuff classes.
COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
    "unlabeled",
)
COCO_UNUSED_THING_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # class ids no COCO annotation uses
CELEBAMASK_HQ_CLASSES = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
    "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)
# cityscapesScripts labels.py, labelIds 0..33; 34 is the license plate, whose id there is -1 (its
# pixels keep their vehicle's id in *_labelIds.png), so that the table has the 35 classes of SPADE.
CITYSCAPES_CLASSES = (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground", "road",
    "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel", "pole",
    "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle", "license plate",
)


class DatasetError(UserError):
    """A dataset on disk (or a flag describing it) is not what the chosen layout expects."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A folder or file that the layout requires does not exist."""


# ----------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Layout:
    """Where one dataset keeps its files and what its stored ids mean.

    Folder patterns take `{split}`; a suffix is stripped from file stems before images, labels and
    instances are paired (Cityscapes names its files `<key>_leftImg8bit.png`, ...). None in a
    class fact means "from <root>/dataset.json" when `metadata_file` is set, else "none"."""
    splits: tuple  # (train split, test split)
    image_dir: str
    label_dir: str
    instance_dir: Optional[str] = None
    image_suffix: str = ""
    label_suffix: str = ""
    instance_suffix: str = ""
    label_is_instance: bool = False  # CelebAMask-HQ: the label map doubles as instance map
    instance_optional: bool = False  # folder: instances only where <split>/instances exists
    num_classes: Optional[int] = None  # one-hot width, after remapping
    raw_unlabeled_id: Optional[int] = None  # stored id of unlabeled pixels
    unlabeled_class: Optional[int] = None  # class id that raw_unlabeled_id becomes (None: kept as is)
    id_shift: int = 0  # every other raw id k becomes class k - id_shift
    class_names: Optional[tuple] = None  # by class id, when known for certain
    metadata_file: Optional[str] = None  # <root>/<file> gives num_classes, unlabeled_id, classes
    description: str = ""

    @property
    def test_split(self):
        return self.splits[1]


LAYOUTS = {
    "ade20k": Layout(
        ("training", "validation"), "images/{split}", "annotations/{split}",
        num_classes=151, raw_unlabeled_id=0, unlabeled_class=150, id_shift=1, class_names=ADE20K_CLASSES,
        description="<root>/images/{training,validation}/*.jpg and <root>/annotations/{training,validation}/*.png"),
    "coco": Layout(
        ("train", "val"), "{split}_img", "{split}_label", "{split}_inst",
        num_classes=183, raw_unlabeled_id=255, unlabeled_class=182, class_names=COCO_STUFF_CLASSES,
        description="<root>/{train,val}_img/*.jpg, <root>/{train,val}_label/*.png and <root>/{train,val}_inst/*.png"),
    "celeba": Layout(
        ("train", "test"), "{split}/images", "{split}/labels", label_is_instance=True,
        num_classes=19, class_names=CELEBAMASK_HQ_CLASSES,
        description="<root>/{train,test}/images/*.jpg and <root>/{train,test}/labels/*.png"),
    "cityscapes": Layout(
        ("train", "val"), "leftImg8bit/{split}", "gtFine/{split}", "gtFine/{split}",
        "_leftImg8bit", "_gtFine_labelIds", "_gtFine_instanceIds",
        num_classes=35, raw_unlabeled_id=0, class_names=CITYSCAPES_CLASSES,
        description="<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                    "<root>/gtFine/{train,val}/<city>/*_gtFine_{labelIds,instanceIds}.png"),
    "folder": Layout(
        ("train", "test"), "{split}/images", "{split}/labels", "{split}/instances", instance_optional=True,
        metadata_file=DATASET_JSON,
        description="<root>/{train,test}/{images,labels[,instances]}/ with --num_classes or <root>/dataset.json"),
}


def get_layout(dataset_mode):
    if dataset_mode not in LAYOUTS:
        raise DatasetError(f"--dataset_mode {dataset_mode!r} is not a known layout; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[dataset_mode]


# ----------------------------------------------------------------------------------------------
# Facts that may come from <root>/dataset.json


def check_int(value, what, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{what} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DatasetError(f"{what}={value} is outside {lo}..{hi}")
    return int(value)


def read_metadata(dataset_mode, data_dir):
    """The JSON object of the layout's metadata file ({} when the layout has none or it is absent)."""
    layout = get_layout(dataset_mode)
    if not layout.metadata_file or not data_dir:
        return {}
    path = os.path.join(data_dir, layout.metadata_file)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object like {{\"num_classes\": 8, \"unlabeled_id\": 7}}")
    return meta


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset: its one-hot width and edge channel."""
    num_classes: int
    unlabeled_id: Optional[int]  # the unlabeled class, after remapping
    has_instance: bool


def has_instances(dataset_mode, data_dir=None):
    """Whether items come with an instance map (folder: when any split has instances/)."""
    layout = get_layout(dataset_mode)
    if layout.instance_optional:
        return bool(data_dir) and any(
            os.path.isdir(os.path.join(data_dir, layout.instance_dir.format(split=s))) for s in layout.splits)
    return layout.instance_dir is not None or layout.label_is_instance


def dataset_info(dataset_mode, data_dir=None, num_classes=None, unlabeled_id=None):
    """Class count, unlabeled class and instance availability of a layout.

    Flags win over the layout's defaults and over `<root>/dataset.json` (folder layout). A
    negative `num_classes` or `unlabeled_id` means "not given" (the flags' -1 defaults).
    """
    layout = get_layout(dataset_mode)
    if num_classes is not None and num_classes < 0:
        num_classes = None
    if unlabeled_id is not None and unlabeled_id < 0:
        unlabeled_id = None
    nc, unl = layout.num_classes, layout.unlabeled_class
    source = unl_source = f"--dataset_mode {dataset_mode}"
    if layout.metadata_file:
        meta = read_metadata(dataset_mode, data_dir)
        nc, unl = meta.get("num_classes"), meta.get("unlabeled_id")
        source = unl_source = os.path.join(data_dir, layout.metadata_file) if meta else source
    if num_classes is not None:
        nc, source = num_classes, "--num_classes"
    if unlabeled_id is not None:
        unl, unl_source = unlabeled_id, "--unlabeled_id"
    if nc is None:
        if data_dir and not os.path.isdir(data_dir):  # the real problem, not the class count
            require_data_dir(dataset_mode, data_dir)
        where = os.path.join(data_dir, DATASET_JSON) if data_dir else "<root>/dataset.json"
        raise DatasetError(
            f"--dataset_mode {dataset_mode} needs the number of classes: pass --num_classes N "
            f"or write {where} containing {{\"num_classes\": N, \"unlabeled_id\": null}}")
    nc = check_int(nc, f"num_classes ({source})", lo=1)
    if unl is not None:
        unl = check_int(unl, "unlabeled_id")
        if not 0 <= unl < nc:
            raise DatasetError(f"unlabeled_id={unl} is outside 0..{nc - 1}: the unlabeled id comes from {unl_source}, "
                               f"num_classes={nc} from {source}")
    return DatasetInfo(num_classes=nc, unlabeled_id=unl, has_instance=has_instances(dataset_mode, data_dir))


def raw_unlabeled_id(dataset_mode, data_dir=None):
    """The stored id of unlabeled pixels, or None when the dataset has none (CelebAMask-HQ) or its
    dataset.json does not say (folder; there class ids are the stored ids)."""
    layout = get_layout(dataset_mode)
    if not layout.metadata_file:
        return layout.raw_unlabeled_id
    meta = read_metadata(dataset_mode, data_dir)
    value = meta.get("unlabeled_id")
    if value is None:
        return None
    return check_int(value, f"unlabeled_id of {os.path.join(data_dir, layout.metadata_file)}", lo=0)


def class_names(dataset_mode, data_dir=None):
    """Names by class id, or None where not known (folder without "classes" in dataset.json)."""
    layout = get_layout(dataset_mode)
    if layout.metadata_file:
        names = read_metadata(dataset_mode, data_dir).get("classes")
        return tuple(str(n) for n in names) if isinstance(names, list) else None
    return layout.class_names


def display_names(dataset_mode, num_classes, data_dir=None, unlabeled_id=None):
    """A name for every class id 0..num_classes-1, for legends and reports: the layout's names where
    known, "unlabeled" for the unlabeled class, "class k" elsewhere (so a legend never has holes)."""
    known = None
    if dataset_mode in LAYOUTS:
        known = class_names(dataset_mode, data_dir)
    names = [f"class {k}" for k in range(int(num_classes))]
    for k, name in enumerate((known or ())[: len(names)]):
        names[k] = str(name)
    if unlabeled_id is not None and 0 <= unlabeled_id < len(names) and not known:
        names[unlabeled_id] = "unlabeled"
    return tuple(names)


# ----------------------------------------------------------------------------------------------
# Listing and matching


class Record(NamedTuple):
    key: str
    image: str
    label: str
    instance: Optional[str]


def list_files(folder, suffix=""):
    """{name stem (suffix removed): path} for every image file below `folder`."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            if suffix:
                if not stem.endswith(suffix):
                    continue
                stem = stem[: -len(suffix)]
            path = os.path.join(dirpath, name)
            if stem in files:
                raise DatasetError(f"two files in {folder} share the name stem {stem!r}: {files[stem]} and {path}; "
                                   "files are matched by stem, so stems must be unique")
            files[stem] = path
    return files


def require_data_dir(dataset_mode, data_dir):
    if not data_dir or not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f"--data_dir {data_dir!r} is not a folder; --dataset_mode {dataset_mode} "
                                   f"expects {get_layout(dataset_mode).description}")


def _require_dir(path, dataset_mode, data_dir, what):
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{what} folder {path} does not exist; --data_dir {data_dir} does not follow the "
                                   f"{dataset_mode} layout: {get_layout(dataset_mode).description}")


def _unmatched_error(have, have_dir, missing_what, other_dir, names):
    listed = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
    return DatasetError(f"{len(names)} {have} in {have_dir} have no {missing_what} with the same name stem in "
                        f"{other_dir}: {listed}")


def _match(images, image_dir, others, other_dir, what):
    missing = sorted(set(images) - set(others))
    if missing:
        raise _unmatched_error("image(s)", image_dir, what, other_dir, missing)
    extra = sorted(set(others) - set(images))
    if extra:
        raise _unmatched_error(f"{what}(s)", other_dir, "image", image_dir, extra)


def list_records(dataset_mode, data_dir, is_train=True, info=None, split=None):
    """All (image, label, instance) triples of one split, matched by stem and sorted by stem.

    `split`: a folder name replacing the layout's train or test split (`is_train`)."""
    layout = get_layout(dataset_mode)
    data_dir = os.fspath(data_dir) if data_dir else data_dir
    require_data_dir(dataset_mode, data_dir)
    with_instances = info.has_instance if info is not None else has_instances(dataset_mode, data_dir)
    split = split or layout.splits[0 if is_train else 1]
    image_dir = os.path.join(data_dir, layout.image_dir.format(split=split))
    label_dir = os.path.join(data_dir, layout.label_dir.format(split=split))
    _require_dir(image_dir, dataset_mode, data_dir, "image")
    _require_dir(label_dir, dataset_mode, data_dir, "label")
    images = list_files(image_dir, layout.image_suffix)
    if not images:
        raise DatasetError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {image_dir}; "
                           f"--dataset_mode {dataset_mode} expects {layout.description}")
    labels = list_files(label_dir, layout.label_suffix)
    _match(images, image_dir, labels, label_dir, "label map")
    instances = None
    if layout.instance_dir is not None and with_instances:
        instance_dir = os.path.join(data_dir, layout.instance_dir.format(split=split))
        if layout.instance_optional and not os.path.isdir(instance_dir):
            raise DatasetNotFoundError(
                f"instance folder {instance_dir} does not exist, but another split of {data_dir} has instance "
                "maps (so the model takes an edge channel); add it or remove the other split's instances/")
        _require_dir(instance_dir, dataset_mode, data_dir, "instance")
        instances = list_files(instance_dir, layout.instance_suffix)
        _match(images, image_dir, instances, instance_dir, "instance map")
    return [Record(k, images[k], labels[k], instances[k] if instances else None) for k in sorted(images)]


# ----------------------------------------------------------------------------------------------
# Decoding


def _open(path, what):
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{what} {path} does not exist (it was listed when the dataset was built)") from None
    except Exception as e:  # PIL raises many types for corrupt, truncated or unknown files
        raise DatasetError(f"cannot read {what} {path}: {e} (corrupt, truncated or not an image)") from None
    return img


def read_rgb(path):
    """An image as a PIL RGB image; grayscale, RGBA, palette, CMYK and 16-bit are converted."""
    img = _open(path, "image")
    if img.mode in SIXTEEN_BIT_MAP_MODES:  # 16-bit grayscale: scale, do not clip, to 8 bits
        arr = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA", "LA"):
        img = img.convert("RGBA")  # keeps palette transparency warnings away; alpha is dropped below
    return img if img.mode == "RGB" else img.convert("RGB")


def read_ids(path, what="label map", return_palette=False):
    """A map of integer ids (H, W) int64 from an 8/16-bit grayscale or palette image; with
    `return_palette`, also the palette (a list, None unless a palette image), so that a rewritten
    map keeps its colours.

    Palette images store ids as palette indices (the VOC convention). An RGB file is accepted
    only when it is gray (R == G == B): a colour-coded label map cannot be turned into ids here.
    """
    img = _open(path, what)
    palette = img.getpalette() if img.mode in ("P", "PA") else None
    if img.mode in ("LA", "PA"):
        arr = np.asarray(img.getchannel(0))
    elif img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise DatasetError(
                f"{what} {path} is a colour (RGB) image; expected a single-channel map of integer ids "
                "(8/16-bit grayscale or palette PNG). Convert the colour coding to ids first.")
        arr = rgb[..., 0]
    elif img.mode in EIGHT_BIT_MAP_MODES + SIXTEEN_BIT_MAP_MODES:
        arr = np.asarray(img)
    else:
        raise DatasetError(f"{what} {path} has image mode {img.mode}; expected a single-channel map of integer "
                           "ids (8/16-bit grayscale or palette PNG)")
    arr = arr.astype(np.int64)
    return (arr, palette) if return_palette else arr


def resize_ids(arr, size):
    """Nearest-neighbour resize of an id map to PIL size (w, h), as PIL does it for `L` labels."""
    if arr.shape[::-1] == tuple(size):
        return arr
    resized = Image.fromarray(arr.astype(np.int32)).resize(tuple(size), resample=Image.NEAREST)
    return np.asarray(resized).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Label remapping


def remap_labels(raw, dataset_mode, unlabeled_id=None):
    """Stored ids -> class ids by the table's rule; `unlabeled_id` replaces the layout's unlabeled
    class (the --unlabeled_id flag)."""
    layout = get_layout(dataset_mode)
    raw = np.asarray(raw)
    if layout.unlabeled_class is None:
        return raw - layout.id_shift if layout.id_shift else raw
    target = layout.unlabeled_class if unlabeled_id is None else unlabeled_id
    return np.where(raw == layout.raw_unlabeled_id, target, raw - layout.id_shift)


def _present_ids(raw):
    if raw.size and raw.min() >= 0 and raw.max() < 65536:
        return np.flatnonzero(np.bincount(raw.ravel()))
    return np.unique(raw)


def check_label_ids(raw, dataset_mode, info, path):
    """Raise a DatasetError naming `path` when a stored id does not map to a class."""
    layout = get_layout(dataset_mode)
    present = _present_ids(raw)
    mapped = remap_labels(present, dataset_mode, info.unlabeled_id)
    bad = (mapped < 0) | (mapped >= info.num_classes)
    aliased = np.zeros_like(bad)
    if layout.unlabeled_class is not None:  # e.g. ADE20K raw 151 would silently land on the unlabeled class
        aliased = (present != layout.raw_unlabeled_id) & (mapped == info.unlabeled_id)
    if (bad | aliased).any():
        first = np.flatnonzero(bad | aliased)[0]
        raw_bad, class_bad = int(present[first]), int(mapped[first])
        flag = "--num_classes or dataset.json" if layout.metadata_file else f"--dataset_mode {dataset_mode}"
        after = "" if raw_bad == class_bad else f" (class {class_bad} after {dataset_mode} remapping)"
        why = (f" and class {class_bad} is the unlabeled class, which only raw id {layout.raw_unlabeled_id} becomes"
               if aliased[first] else "")
        raise DatasetError(
            f"label map {path} contains id {raw_bad}{after}; expected class ids 0..{info.num_classes - 1} "
            f"(num_classes={info.num_classes} from {flag}){why}. Ids present: {present.tolist()[:20]}")


def dataset_info_for(dataset_mode, data_dir, num_classes=-1, unlabeled_id=-1):
    """The class count (-1: from the dataset) and unlabeled class (-1: the layout's), resolved once."""
    if not dataset_mode:
        raise UserError("--dataset_mode is required (ade20k, coco, celeba, cityscapes or folder)")
    return dataset_info(dataset_mode, data_dir or None, num_classes=num_classes if num_classes > 0 else None,
                        unlabeled_id=unlabeled_id if unlabeled_id >= 0 else None)
