"""Documented commands cannot rot: every command in the fenced blocks of README.md, docs/*.md and
evaluations/README.md names a real entry point and only flags it has; every one that runs on built-in
data (the toy dataset, the quickstart's models, the preset and class tables) is run here on toy sizes,
or by the named test that runs it. A new documented command of that kind fails here until it is added."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_flags import capture_parser
from tiny_run import make_tiny_run

from conftest import in_process_if_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "evaluations" / "README.md"]
BENCHMARKS = ROOT / "benchmarks"
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python|\.venv/bin/python|sh|bash|mpiexec|torchrun|srun|sbatch)\b")


def documented_commands():
    """(file, command) for every command line of a fenced sh block or a 4-space indented block."""
    found = []
    for doc in DOCS:
        lines, in_fence, lang = doc.read_text().splitlines(), False, ""
        block = []
        for line in lines:
            s = line.strip()
            if s.startswith("```"):
                in_fence, lang = (not in_fence), s[3:].strip()
                continue
            if (in_fence and lang in ("sh", "bash", "")) or (not in_fence and line.startswith("    ")
                                                             and COMMAND.match(s)):
                block.append(s)
        text = re.sub(r"\\\s*\n\s*", " ", "\n".join(block))
        for line in text.splitlines():
            line = re.split(r"\s+#\s", " " + line)[0].strip()
            if COMMAND.match(line):
                found.append((doc.relative_to(ROOT).as_posix(), " ".join(line.split())))
    return found


COMMANDS = documented_commands()


def entry_point(words):
    """(kind, target, args) of a command: ('module', 'scdm.image_train', [...]), ('script', ...), ..."""
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]
    if words[0] in ("mpiexec", "srun", "torchrun"):
        if "-m" in words:
            i = words.index("-m")
            return "module", words[i + 1], words[i + 2:]
        python = next(i for i, w in enumerate(words) if w.endswith("python"))
        return entry_point(words[python:])
    if words[0] == "sbatch":
        script = next(w for w in words[1:] if w.endswith(".sbatch"))
        return "sbatch", script, []
    if words[0] in ("sh", "bash"):
        return "script", words[1], words[2:]
    if words[1] == "-m":
        return "module", words[2], words[3:]
    return "file", words[1], words[2:]


def flags_of(args):
    """The --flag names of a command line (values, placeholders like `...` and usage brackets left out)."""
    out = []
    for w in args:
        w = w.strip("[]")
        if w.startswith("--"):
            out.append(w.split("=", 1)[0].rstrip("]"))
    return out


def parser_flags(module, monkeypatch):
    parser = capture_parser(module if module != "scdm.app" else "scdm.app.__main__", monkeypatch)
    return {o for a in parser._actions for o in a.option_strings}


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_names_real_entry_points_and_flags(doc, command, monkeypatch):
    from scdm.presets import ALIASES, PRESETS, SAMPLING, TRAIN_STAGES
    words = shlex.split(command)
    kind, target, args = entry_point(words)
    if kind == "module":
        module = {"evaluations.fid": "evaluations.fid.__main__", "evaluations.lpips": "evaluations.lpips.__main__",
                  "evaluations.miou": "evaluations.miou.__main__",
                  "quickstart": "quickstart.__main__"}.get(target, target)
        known = parser_flags(module, monkeypatch)
        unknown = [f for f in flags_of(args) if f not in known]
        assert not unknown, f"{doc}: `{command}`: {target} has no flag {unknown}"
    elif kind in ("script", "sbatch"):
        assert (ROOT / target).is_file(), f"{doc}: `{command}`: no script {target}"
        name = Path(target).name
        if name in ("train.sh", "sample.sh") and args and args[0] not in ("--help", "-h"):
            assert args[0] in PRESETS, f"{doc}: `{command}`: unknown preset {args[0]}"
            rest = args[1:]
            stages = (*TRAIN_STAGES, *ALIASES) if name == "train.sh" else tuple(SAMPLING)
            if rest and not rest[0].startswith("--"):
                assert rest[0] in stages, f"{doc}: `{command}`: unknown stage {rest[0]}"
                rest = rest[1:]
            known = parser_flags("scdm.image_train" if name == "train.sh" else "scdm.image_sample", monkeypatch)
            unknown = [f for f in flags_of(rest) if f not in known]
            assert not unknown, f"{doc}: `{command}`: {name} passes {unknown} to a tool without them"
    else:
        assert (ROOT / target).is_file(), f"{doc}: `{command}`: no file {target}"
        sys.path.insert(0, str(BENCHMARKS))
        try:
            known = parser_flags(Path(target).stem, monkeypatch)
        finally:
            sys.path.remove(str(BENCHMARKS))
        unknown = [f for f in flags_of(args) if f not in known]
        assert not unknown, f"{doc}: `{command}`: {target} has no flag {unknown}"


# ----- the commands that run on built-in data --------------------------------------------------------
BUILT_IN = re.compile(r"\btoy\b|quickstart|scdm\.presets|scdm\.classes|--help|scripts/test\.sh|--budget tiny")
# Run elsewhere in the suite (the long ones), by the test that runs them:
RUN_BY = {
    "sh scripts/quickstart.sh": "tests/test_quickstart.py::test_pipeline_writes_every_output",
    "sh scripts/test.sh": "the suite itself (.ci/run)",
    ".venv/bin/python benchmarks/robustness.py --budget tiny":
        "tests/test_robustness.py::test_writes_every_output_with_every_per_seed_number",
    "sh scripts/train.sh toy --sample_interval 200":
        "tests/test_run_faults.py::test_train_sh_with_sample_grids_on_a_fresh_run",
    "python -m scdm.app --model_path results/quickstart/train/scdm":
        "tests/test_prompt_exit.py::test_the_painter_serves_a_job_then_ends_on_sigterm_and_ctrl_c_even_mid_job",
}
# Flags appended to make a documented command toy-sized (argparse: the last value wins).
SMALLER = {
    "scdm.image_sample": ["--timestep_respacing", "ddim2", "--num_samples", "2"],
    "scdm.generate": ["--steps", "2", "--num_samples", "1"],
    "scdm.toy": ["--num_train", "8", "--num_test", "4", "--size", "32"],
}


def is_usage_line(command):
    """A synopsis such as `--miou_gt clean|noisy|DIR [--out X]`: flag-checked above, not run."""
    return "[--" in command or "|" in command


def built_in_commands():
    return sorted({c for _, c in COMMANDS if BUILT_IN.search(c) and not is_usage_line(c)})


def test_every_built_in_data_command_is_run():
    run_here = set(RUN_HERE)
    missing = [c for c in built_in_commands() if c not in RUN_BY and c not in run_here]
    assert not missing, ("documented commands on built-in data that no test runs; add them to RUN_HERE or RUN_BY in "
                         f"tests/test_docs.py: {missing}")
    for c, where in RUN_BY.items():
        if "::" in where:
            path, name = where.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), f"{where} (running `{c}`) does not exist"


# In the order they are run, in one folder: each may use what the ones before it wrote.
RUN_HERE = [
    "python -m scdm.toy --out_dir data/toy --num_train 512 --num_test 64 --size 64 --seed 0",
    "python -m scdm.class_schedule --dataset_mode folder --data_dir data/toy --out schedule.npy",
    "sh scripts/train.sh toy",
    "sh scripts/train.sh --help",
    "bash scripts/slurm/train.sbatch --help",
    "python -m scdm.plot_progress OUTPUT/toy-SCDM",
    "python -m scdm.image_sample --model_path OUTPUT/toy-SCDM --data_dir data/toy --results_path RESULTS/toy "
    "--timestep_respacing ddim25 --s 1.5 --extrapolation 0.8 --dynamic_threshold 0.95",
    "python -m scdm.image_sample --model_path OUTPUT/toy-SCDM --data_dir data/toy --results_path RESULTS/toy-10 "
    "--sampler dpm++2m-sde --timestep_respacing logsnr10 --s 1.5 --dynamic_threshold 0.95",
    "python -m evaluations.miou --segmenter toy --samples results/toy/samples --gt results/toy/labels",
    "python -m scdm.presets ade20k train",
    "python -m scdm.classes ade20k",
    "python -m scdm.generate --model_path results/quickstart/train/scdm --labels my_maps/ --out generated/",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder where the documented commands find what they expect: the quickstart's SCDM run (a
    tiny random one), a label map of your own, and a results/toy folder."""
    import shutil
    from scdm.toy import make_toy_dataset
    ws = tmp_path_factory.mktemp("docs")
    run = ws / "results" / "quickstart" / "train" / "scdm"
    run.mkdir(parents=True)
    make_tiny_run(run, image_size=32, num_classes=8, unlabeled_id=7)
    toy = make_toy_dataset(ws / "scratch_toy", 1, 2, 32, 0)
    (ws / "my_maps").mkdir()
    shutil.copy(Path(toy) / "test" / "labels" / "00000.png", ws / "my_maps" / "a.png")
    for sub in ("samples", "labels"):
        shutil.copytree(Path(toy) / "test" / ("images" if sub == "samples" else "labels"), ws / "results" / "toy" / sub)
    return ws


def run_documented(command, cwd):
    words = shlex.split(command)
    kind, target, _ = entry_point(words)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MAX_STEPS="2", PYTHON=sys.executable)
    if kind == "module":
        words = [sys.executable, *words[1:], *SMALLER.get(target, [])]
        quick = in_process_if_cli(words, cwd=cwd)  # the same main and argv, without a new interpreter
        if quick is not None:
            return quick
    elif kind == "script":
        words = [words[0], str(ROOT / target), *words[2:]]
        if target.endswith("train.sh") and "--help" not in words:
            words += ["--batch_size", "2", "--save_interval", "2", "--ema_rate", "0.9999", "--log_interval", "1"]
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_built_in_data_commands_run_as_documented(workspace):
    documented = set(built_in_commands())
    for command in RUN_HERE:
        assert command in documented, f"RUN_HERE lists `{command}`, which no page documents any more"
        p = run_documented(command, workspace)
        assert p.returncode == 0, f"`{command}` failed ({p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}"
        assert "Traceback" not in p.stderr, f"`{command}`:\n{p.stderr[-3000:]}"
    assert list((workspace / "OUTPUT" / "toy-SCDM").glob("ema_0.9999_*.pt"))
    assert len(list((workspace / "RESULTS" / "toy" / "samples").glob("*.png"))) == 2
    assert list((workspace / "generated" / "samples").glob("a_*.png"))
