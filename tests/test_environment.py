"""The environment is the lock file's: setup_env.sh installs constraints.txt's versions, and the
conda recipe points at the same file."""
import ast
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pins():
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert m, f"constraints.txt: not a name==version pin: {line!r}"
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def setup_py_requirements():
    """The package names of every requirement string in setup.py (core and extras)."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"([A-Za-z][A-Za-z0-9_.\-]*)\s*(>=|==|<=|~=|<|>).*", node.value)
            if m:
                names.add(m.group(1).lower().replace("_", "-"))
    return names


def test_lock_pins_every_package_setup_py_asks_for():
    lock = pins()
    names = setup_py_requirements()
    assert {"torch", "numpy", "pytest", "mpich"} <= names
    missing = sorted(name for name in names if name not in lock)
    assert not missing, f"constraints.txt lacks {missing}; run sh scripts/refresh_lock.sh"


def test_repository_venv_has_the_locked_versions():
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not running in the repository's .venv (scripts/setup_env.sh makes it from the lock)")
    wrong = {}
    for name, version in pins().items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            got = None
        if got != version:
            wrong[name] = (version, got)
    assert not wrong, f"installed versions differ from constraints.txt (locked, installed): {wrong}"


def test_conda_recipe_installs_from_the_lock():
    text = (ROOT / "environment.yaml").read_text()
    assert "- -c constraints.txt" in text and "- -e .[test]" in text
    locked = re.search(r"Made with Python (\d+\.\d+)", (ROOT / "constraints.txt").read_text()).group(1)
    assert f"python={locked}" in text, f"environment.yaml's python is not the lock's {locked}"


def test_the_suite_runs_on_the_cpu_unless_asked_for_the_gpu(request):
    """Subprocesses inherit CUDA_VISIBLE_DEVICES="" too: on a GPU node two test ranks never share a GPU."""
    import torch
    if "gpu" in (request.config.option.markexpr or ""):
        pytest.skip("a -m gpu run may use the GPU")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
