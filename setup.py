"""Packaging for scdm: `pip install -e .` (core), `pip install -e .[test]` (everything the tests use)."""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.1",
    "torchvision>=0.16",
    "numpy>=1.23",
    "Pillow>=9.0",
    "scipy>=1.9",
    "tqdm>=4.64",
]
MPI = ["mpi4py>=4.0", "mpich>=4.1"]  # the mpich wheel gives mpiexec inside a venv
EVAL = ["lpips>=0.1.4", "pytorch-fid>=0.3.0"]
BENCH = ["matplotlib>=3.5"]  # the plots of benchmarks/bench_steps.py
BROWSER = ["selenium>=4.10"]  # the painter's browser test (it also needs Chromium and its driver)
MONITOR = ["tensorboard>=2.10", "matplotlib>=3.5"]  # event files of image_train, python -m scdm.plot_progress
# xdist: the suite runs on every core; ruff: the lint the test command runs first
TEST = ["pytest>=7.0", "pytest-xdist>=3.0", "ruff>=0.5"] + MPI + EVAL + BROWSER + MONITOR

setup(
    name="scdm",
    version="0.1.0",
    description="Stochastic Conditional Diffusion Models for robust semantic image synthesis",
    license="MIT",
    packages=find_packages(include=["scdm", "scdm.*", "image_process", "evaluations", "evaluations.*", "quickstart"]),
    python_requires=">=3.9",
    package_data={"scdm.app": ["static/*.html", "static/*.js", "static/*.css"]},
    install_requires=CORE,
    extras_require={"mpi": MPI, "eval": EVAL, "monitor": MONITOR, "test": TEST, "bench": BENCH,
                    "all": TEST + BENCH},
)
