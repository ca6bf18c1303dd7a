"""python -m scdm.classes: the class ids a user draws with, for every dataset, from the dataset table."""
import json

import numpy as np
import pytest

from scdm.classes import DATASETS, class_table, main
from scdm.data.dataset_layouts import LAYOUTS, remap_labels
from scdm.runtime.errors import run_cli


@pytest.mark.parametrize("dataset", sorted(set(LAYOUTS) - {"folder"}))
def test_raw_ids_are_what_the_loader_maps_to_each_class(dataset):
    rows = class_table(dataset)
    assert [r["id"] for r in rows] == list(range(LAYOUTS[dataset].num_classes))
    raw = np.array([r["raw_id"] for r in rows])
    assert (remap_labels(raw, dataset) == np.arange(len(rows))).all()  # the loader's own rule, inverted here
    assert len({r["color"] for r in rows}) == len(rows)  # every class tells apart on the painter's canvas


def test_ade20k_lists_its_151_classes(capsys):
    assert main(["ade20k"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 151
    assert lines[1].split() == ["0", "1", lines[1].split()[2], "wall"]
    assert lines[-1].split() == ["150", "0", "#000000", "unlabeled"]


def test_toy_and_folder_datasets(tmp_path, capsys):
    from scdm.toy import TOY_CLASSES, make_toy_dataset
    assert [r["name"] for r in class_table("toy")] == [c.name for c in TOY_CLASSES]
    toy = make_toy_dataset(tmp_path / "toy", 1, 1, 16, 0)
    assert main(["folder", "--data_dir", str(toy), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [c.name for c in TOY_CLASSES] and rows[7]["color"] == "#000000"
    assert rows == class_table("toy")  # a toy tree is drawn in the toy colours
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["folder"])
    assert e.value.code == 2 and "pass --data_dir" in capsys.readouterr().err
    assert "toy" in DATASETS and "cityscapes" in DATASETS
