"""The structure docs/architecture.md promises, checked on the source (ast), so it cannot drift:
package layering without cycles, no private names across modules, one owner per shared fact."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scdm", "image_process", "evaluations", "quickstart")
# Who may import whom: scdm is the base; the tools build on it; the quickstart drives them all.
ALLOWED = {
    "scdm": set(),
    "image_process": {"scdm"},
    "evaluations": {"scdm"},
    "quickstart": {"scdm", "image_process", "evaluations"},
}


def python_files(*tops):
    for top in tops:
        yield from sorted((ROOT / top).rglob("*.py"))


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path):
    """(imported module, names) for every import statement, wherever it is (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            yield base, [a.name for a in node.names]


def test_packages_are_layered_without_cycles():
    edges = {p: set() for p in PACKAGES}
    for pkg in PACKAGES:
        for path in python_files(pkg):
            for mod, _ in imports(path):
                top = mod.split(".")[0]
                if top in PACKAGES and top != pkg:
                    edges[pkg].add(top)
                    assert top in ALLOWED[pkg], \
                        f"{path.relative_to(ROOT)} imports {mod}: {pkg} may import {ALLOWED[pkg]}"
    # The allowed graph itself is acyclic (a topological order exists).
    order, remaining = [], dict(edges)
    while remaining:
        free = [p for p, deps in remaining.items() if deps <= set(order)]
        assert free, f"import cycle among {sorted(remaining)}"
        order += free
        for p in free:
            del remaining[p]


def test_no_private_names_across_modules():
    problems = []
    for path in python_files(*PACKAGES, "tests", "benchmarks"):
        for mod, names in imports(path):
            if mod == module_name(path):
                continue
            problems += [f"{path.relative_to(ROOT)}: from {mod} import {n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text())
        imported_modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                            for a in n.names if a.name.split(".")[0] in PACKAGES}
        imported_modules |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                             for a in n.names if (n.module or "").split(".")[0] in PACKAGES or n.level}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


# The command-line programs of scdm: the library under them never imports one (a user's Python code,
# the pipeline and the tools load checkpoints and sample through scdm.loading and scdm.diffusion.sampling).
ENTRY_POINTS = ("scdm.image_train", "scdm.image_sample", "scdm.generate", "scdm.app", "scdm.overview")


def is_entry_point(mod):
    return any(mod == e or mod.startswith(e + ".") for e in ENTRY_POINTS)


def test_the_library_imports_no_entry_point():
    problems = []
    for path in python_files("scdm"):
        here = module_name(path)
        if is_entry_point(here):
            continue
        for mod, names in imports(path):
            targets = [mod] + [f"{mod}.{n}" for n in names]
            problems += [f"{path.relative_to(ROOT)} imports {t}" for t in targets if is_entry_point(t)]
    assert not problems, "library modules importing an entry point:\n" + "\n".join(problems)


# The layers of scdm (docs/architecture.md): which subpackage may import which. The modules at the
# top of scdm (entry points, the pipeline, the loader, the flag table, presets) may use them all.
LAYERS = {
    "runtime": set(),
    "fast": {"runtime"},
    "models": {"fast", "runtime"},
    "diffusion": {"runtime"},
    "data": {"runtime"},
    "training": {"models", "diffusion", "data", "fast", "runtime"},
}
# Modules at the top of scdm that a layer may read: facts (toy data, Slurm's syntax) and, for the
# training loop, the builders and files of a run.
TOP_FACTS = {"data": {"scdm.toy"}, "runtime": {"scdm.slurm"},
             "training": {"scdm.toy", "scdm.flags", "scdm.figures", "scdm.presets", "scdm.script_util",
                          "scdm.checkpoint"}}


def test_subpackages_are_layered():
    assert all((ROOT / "scdm" / layer / "__init__.py").is_file() for layer in LAYERS)
    problems = []
    for layer, allowed in LAYERS.items():
        for path in python_files(f"scdm/{layer}"):
            for mod, names in imports(path):
                parts = mod.split(".")
                if parts[0] != "scdm":
                    continue
                if len(parts) == 1:  # from scdm import x
                    parts = ["scdm", names[0]] if names else parts
                target = parts[1] if len(parts) > 1 else ""
                if target == layer or target in allowed or ".".join(parts[:2]) in TOP_FACTS.get(layer, set()):
                    continue
                problems.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_production_code_does_not_import_unittest():
    """unittest (mock included) is for the tests; production code swaps nothing behind a mock."""
    found = [f"{path.relative_to(ROOT)}: {mod}" for path in python_files(*PACKAGES, "benchmarks")
             for mod, _ in imports(path) if mod.split(".")[0] == "unittest"]
    assert not found, "unittest imported by production code:\n" + "\n".join(found)


def test_sampler_does_not_import_the_network():
    mods = [m for m, _ in imports(ROOT / "scdm" / "diffusion" / "sampling.py")]
    assert not any(m.endswith("unet") for m in mods), mods


def test_network_files_hold_the_architecture_and_the_fast_paths_sit_beside_them():
    """spade.py and unet.py read as the released network: the SPADE norm imports only the building blocks, the
    UNet takes only the FastPaths type and the fast-path modules' entry points (no autotuning of its
    own); the fast-path modules know no architecture class."""
    def ours(path):
        return [(m, n) for m, n in imports(path) if m.split(".")[0] == "scdm"]

    assert {m for m, _ in ours(ROOT / "scdm" / "models" / "spade.py")} <= {"scdm.models.nn"}
    unet = dict(ours(ROOT / "scdm" / "models" / "unet.py"))
    assert unet["scdm.fast.fast_paths"] == ["FastPaths"], unet
    assert set(unet) <= {"scdm.fast.fast_paths", "scdm.fast.fast_unet", "scdm.models.nn", "scdm.models.spade"}, unet
    for fast in ("fast_unet.py", "fast_spade.py"):
        assert not {m for m, _ in ours(ROOT / "scdm" / "fast" / fast)} & {"scdm.models.unet", "scdm.models.spade"}, fast


@pytest.mark.parametrize("pattern, owner, what", [
    (r"os\.replace\(|mkstemp\(|NamedTemporaryFile\(", "scdm/runtime/fileio.py", "atomic file writing"),
    (r"^\s*(IMAGE_EXTENSIONS|IMAGE_EXTS)\s*=", None, "the image extensions"),
    (r"^(RELEASED_ARCH|TOY_ARCH|ARCH)\s*=", "scdm/presets.py", "a model preset"),
    (r"^LAYOUTS\s*[:=]", "scdm/data/dataset_layouts.py", "the dataset layouts"),
    (r"^def read_ids\(", "scdm/data/dataset_layouts.py", "the id-map reader"),
    (r"^class \w*Error\((Exception|ValueError|RuntimeError)\)", "scdm/runtime/errors.py", "a user-error base class"),
    (r"\bsave_atomic\(|^def (save_set|resolve_resume|latest_complete_set|check_resume_members)\(",
     "scdm/checkpoint.py", "writing, finding or checking a checkpoint set"),
])
def test_one_owner(pattern, owner, what):
    rx = re.compile(pattern, re.M)
    found = sorted(str(p.relative_to(ROOT)) for p in python_files(*PACKAGES, "benchmarks") if rx.search(p.read_text()))
    if owner is None:  # exactly one definition, inside scdm
        assert len(found) == 1 and found[0].startswith("scdm/"), f"{what} defined in {found}"
    else:
        assert found == [owner], f"{what} defined outside {owner}: {found}"


def test_scripts_have_no_arch_flags():
    """The shell scripts read the presets instead of spelling out architectures."""
    for script in (ROOT / "scripts").glob("*.sh"):
        assert "--num_channels" not in script.read_text(), script.name


def test_no_references_outside_the_repository():
    rx = re.compile(r"DESIGN\.md|DESIGN §|\bissue \d+\b", re.I)
    files = [p for p in python_files(*PACKAGES, "tests", "benchmarks") if p.name != "test_architecture.py"]
    files += list((ROOT / "scripts").glob("*.sh")) + [ROOT / "README.md"] + list((ROOT / "docs").glob("*.md"))
    bad = [str(p.relative_to(ROOT)) for p in files if rx.search(p.read_text())]
    assert not bad, f"references to files or issues outside the repository in {bad}"


def test_committed_results_name_no_machines_folders():
    """Committed results JSON record paths relative to the repository (scdm.runtime.fileio.recorded_path)."""
    import json
    absolute = []

    def walk(value, where):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str) and value.startswith("/") and value.count("/") > 1:
            absolute.append(f"{where}: {value}")

    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        walk(json.loads(path.read_text()), path.name)
    assert not absolute, "absolute paths in committed results:\n" + "\n".join(absolute)


def test_no_test_skips_when_a_module_of_ours_fails_to_import():
    """An import error in our own code must fail the suite, not turn into skips."""
    own = (*PACKAGES, "benchmarks", "tiny_run")
    offenders = []
    for path in python_files("tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).split(".")[0] in own):
                offenders.append(f"{path.name}:{node.lineno} {node.args[0].value}")
    assert not offenders, offenders
