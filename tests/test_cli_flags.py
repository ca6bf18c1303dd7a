"""Every flag of every command-line tool is typed and range-checked when the command line is parsed:
a number flag given a word, a huge negative number, NaN or infinity stops at once with argparse's
one line naming the flag (exit 2), before any work. The walk finds the flags itself, so a flag added
later without a checked type fails here."""
import argparse
import importlib
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmark scripts with a main()

CLIS = [
    "scdm.image_train", "scdm.image_sample", "scdm.toy", "scdm.class_schedule", "scdm.presets", "scdm.generate",
    "scdm.app.__main__", "scdm.slurm", "scdm.classes", "image_process.describe", "image_process.downsample",
    "image_process.edge", "image_process.random",
    "image_process.painter", "image_process.figure", "evaluations.fid.__main__", "evaluations.lpips.__main__",
    "evaluations.miou.__main__", "evaluations.report", "quickstart.__main__", "robustness", "bench_corruptions",
    "bench_loader", "bench_steps", "bench_sample", "bench_model",
]

# Number flags where any integer is meaningful (none today); listed with the reason when added.
SIGNED_FLAGS = {}


# scdm.runtime.cli's checked number types, for flags whose default is "absent" (argparse.SUPPRESS).
FLOAT_TYPES = ("probability", "positive_float", "nonnegative_float", "float_in")
NUMBER_TYPES = ("positive_int", "nonnegative_int", "int_at_least", *FLOAT_TYPES)


def type_name(action):
    return getattr(action.type, "__name__", "")


def is_float_flag(action):
    return isinstance(action.default, float) or action.type is float or type_name(action).startswith(FLOAT_TYPES)


class Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


class Rejected(Exception):
    pass


def capture_parser(module_name, monkeypatch):
    """The parser a tool's main() builds, taken at its first parse, before the tool does anything."""
    module = importlib.import_module(module_name)

    def grab(self, *args, **kwargs):
        raise Captured(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        m.setattr(argparse.ArgumentParser, "parse_known_args", grab)
        try:
            module.main([])
        except Captured as c:
            return c.parser
    raise AssertionError(f"{module_name}.main() finished without parsing a command line")


def number_flags(parser):
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
            continue
        default = action.default
        if isinstance(default, bool) or action.choices:
            continue
        if isinstance(default, (int, float)) or action.type in (int, float) or (
                default in (None, argparse.SUPPRESS) and type_name(action).startswith(NUMBER_TYPES)):
            yield max(action.option_strings, key=len), action


def parse_error(parser, argv):
    """argparse's error message for argv (None when it parses)."""
    def error(message):
        raise Rejected(message)
    original = parser.error
    parser.error = error
    try:
        parser.parse_known_args(argv)
    except Rejected as e:
        return str(e)
    finally:
        parser.error = original
    return None


@pytest.mark.parametrize("module_name", CLIS)
def test_every_number_flag_is_typed_and_range_checked(module_name, monkeypatch):
    parser = capture_parser(module_name, monkeypatch)
    flags = list(number_flags(parser))
    problems = []
    for flag, action in flags:
        bad = ["abc", "nan", "inf"] if is_float_flag(action) else ["abc", "1.5"]
        if flag not in SIGNED_FLAGS:
            bad.append("-1000000")
        for value in bad:
            message = parse_error(parser, [flag, value])
            if message is None:
                problems.append(f"{flag} {value} accepted")
            elif f"argument {flag}" not in message and not any(f"argument {o}" in message
                                                                 for o in action.option_strings):
                problems.append(f"{flag} {value}: the message does not name the flag: {message}")
        # The default itself passes the flag's own check.
        if action.type is not None and action.default not in (None, argparse.SUPPRESS) and not (
                isinstance(action.default, float) and math.isnan(action.default)):
            try:
                action.type(str(action.default))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                problems.append(f"{flag}: its default {action.default!r} fails its own check: {e}")
    assert not problems, f"{module_name}:\n" + "\n".join(problems)


def test_the_walk_sees_the_flags_it_should():
    """The capture works on a tool with known number flags (the walk would pass vacuously otherwise)."""
    mp = pytest.MonkeyPatch()
    try:
        flags = dict(number_flags(capture_parser("scdm.image_train", mp)))
    finally:
        mp.undo()
    assert {"--save_interval", "--log_interval", "--diffusion_steps", "--lr", "--batch_size"} <= set(flags)
    assert parse_error(capture_parser("scdm.image_train", pytest.MonkeyPatch()), ["--save_interval", "0"])


@pytest.mark.parametrize("module_name", CLIS)
def test_no_flag_is_taken_by_its_prefix(module_name, monkeypatch):
    """A typo or an unknown flag is an error naming it, never another flag (e.g. the released `--gpu 0`
    must not become `--gpus_per_node 0`)."""
    parser = capture_parser(module_name, monkeypatch)
    assert parser.allow_abbrev is False, f"{module_name}: argparse prefix matching is on"


def test_an_abbreviated_flag_is_an_error_naming_it(capsys):
    from scdm.image_train import create_argparser
    with pytest.raises(SystemExit) as e:
        create_argparser().parse_args(["--save_inter", "5"])
    assert e.value.code == 2 and "unrecognized arguments: --save_inter 5" in capsys.readouterr().err


def test_released_gpu_flags():
    """`--gpu N` is the released device flag of a single-process run; it is its own flag, and without
    CUDA it is one line naming it."""
    from scdm.runtime import dist_util
    from scdm.image_sample import create_argparser as sample_parser
    from scdm.image_train import create_argparser as train_parser
    for make in (train_parser, sample_parser):
        args = make().parse_args(["--gpu", "0", "--gpus_per_node", "4"])
        assert args.gpu == 0 and args.gpus_per_node == 4
    if not __import__("torch").cuda.is_available():
        with pytest.raises(dist_util.LaunchError, match=r"--gpu 0: CUDA is not available here"):
            dist_util.select_gpu(0)


def test_seed_align_is_accepted_and_false_is_refused_with_the_reason(tmp_path, capsys):
    from scdm.runtime.errors import run_cli
    from scdm.image_sample import create_argparser, main
    assert create_argparser().parse_args(["--seed_align", "True"]).seed_align is True
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--seed_align", "False", "--model_path", str(tmp_path / "m.pt"), "--results_path",
                       str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seed_align False is not available") and "own seeded stream" in err


@pytest.mark.parametrize("module", ["scdm.generate", "scdm.app", "evaluations.fid", "evaluations.lpips",
                                    "evaluations.report"])
@pytest.mark.parametrize("device, words", [("bogus", "'bogus' is not a device"), ("cuda:99", "cuda:99: ")])
def test_a_device_this_machine_lacks_is_one_line_at_parsing(module, device, words):
    from conftest import run_in_process
    p = run_in_process(module, ["--device", device])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "argument --device:" in last and words in last, p.stderr


def test_the_pipeline_refuses_a_device_this_machine_lacks(tmp_path):
    from scdm.pipeline import SCDMPipeline
    from tiny_run import make_tiny_run
    with pytest.raises(ValueError, match="is not a device"):
        SCDMPipeline.from_checkpoint(make_tiny_run(tmp_path), device="nonsense")


@pytest.mark.parametrize("module, args", [
    ("scdm.toy", ["--num_train", "1", "--num_test", "0", "--out_dir"]),
    ("quickstart", ["--quick", "--out_dir"]),
])
def test_an_output_folder_under_a_regular_file_is_one_line(tmp_path, module, args):
    from conftest import run_in_process
    (tmp_path / "file").write_text("x")
    p = run_in_process(module, [*args, tmp_path / "file" / "sub"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(f"--out_dir {tmp_path / 'file' / 'sub'} is not writable: "
                                                      f"{tmp_path / 'file'} is a file, not a folder"), p.stderr


@pytest.mark.parametrize("module, args", [("scdm.toy", ["--out_dir", "unused"]), ("image_process.figure", [])])
def test_an_image_side_too_large_for_memory_is_refused_at_parsing(module, args, tmp_path):
    from conftest import run_in_process
    p = run_in_process(module, [*args, "--size", "100000"], cwd=tmp_path)
    assert p.returncode == 2 and "argument --size: an integer in" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was written
