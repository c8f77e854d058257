"""Shared fixtures: a tiny synthetic MNIST in torchvision's layout, and `kd` run in-process (or,
where a real process is the point, as the installed command).

`pytest --reverse` runs the tests in reverse order: the suite must not depend on its order."""
import contextlib
import importlib.util
import io
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

KD = str(Path(sys.executable).with_name("kd"))
TINY = ["model.hidden=[16]"]  # a width that learns the synthetic digits in a few epochs
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def composed(stage, *overrides):
    """A stage's config as `kd <stage> overrides...` composes it from the installed package."""
    from hydra import compose, initialize_config_module

    from kd_cli.cli import STAGES
    with initialize_config_module("kd_cli.conf", version_base="1.3"):
        return compose(STAGES[stage][0], overrides=list(overrides), return_hydra_config=True)


def load_script(name):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_installed_from_this_checkout():
    """kd's code, configs and shipped teacher must be this checkout's: an editable install maps
    kd_cli.conf and kd_cli.pretrained to the checkout it was made from, so a second checkout with
    PYTHONPATH set (or another's venv) would test its code against the first one's configs."""
    import importlib

    here = SCRIPTS.parent
    for name, folder in (("kd_cli", "kd_cli"), ("kd_cli.conf", "conf"), ("kd_cli.pretrained", "pretrained")):
        found = Path(next(iter(importlib.import_module(name).__path__))).resolve()
        if found != (here / folder).resolve():
            pytest.exit(f"{name} is imported from {found}, not from this checkout ({here / folder}): run "
                        f"`pip install -e .` here (in this checkout's venv) so that the tests test this checkout",
                        returncode=4)


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true", help="run the tests in reverse order")


def pytest_configure(config):
    _check_installed_from_this_checkout()
    config.addinivalue_line("markers", "subprocess: runs the installed `kd` as a real process "
                            "(signals, launchers); select with -m subprocess")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; CI has none): "
                            "select with -m cuda on a GPU machine")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


def write_idx(path, array):
    """IDX as MNIST ships it: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def synthetic_digits(n, rng):
    """Learnable images: class c lights a 4x4 block at its own place, plus noise (so every image
    is unique, and an image can be recognised by its pixels)."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(labels):
        r, col = 4 + 8 * (c // 4), 3 + 6 * (c % 4)
        images[i, r:r + 4, col:col + 4] = 255
    return images, labels


def write_root(root, n_train=600, n_test=200, seed=0):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = synthetic_digits(n, rng)
        write_idx(raw / f"{split}-images-idx3-ubyte", x)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y)
    return root


@pytest.fixture(scope="session", autouse=True)
def _teacher_cache_out_of_home(tmp_path_factory):
    """kd distill keeps teachers' logits in KD_CACHE_DIR (default ~/.cache/kd): never the user's
    home from a test, whatever fixture scope distills."""
    saved = os.environ.get("KD_CACHE_DIR")
    os.environ["KD_CACHE_DIR"] = str(tmp_path_factory.mktemp("kd-cache-session"))
    yield
    os.environ.pop("KD_CACHE_DIR") if saved is None else os.environ.update(KD_CACHE_DIR=saved)


@pytest.fixture(autouse=True)
def teacher_cache(tmp_path_factory, monkeypatch):
    """A cache of teachers' logits of this test's own, so that a teacher runs in every test that
    watches it run (a test that reuses a file says so by distilling twice)."""
    folder = tmp_path_factory.mktemp("kd-cache")
    monkeypatch.setenv("KD_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A data root with 600 training and 200 test images under MNIST/raw."""
    return write_root(tmp_path_factory.mktemp("data"))


def run_in_process(args, cwd, env):
    """`kd *args` in this process, as the console script would run it: (exit code, stdout, stderr)."""
    from kd_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args)) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def kd(tmp_path, tiny_root):
    """`kd(*args)` runs kd in-process in tmp_path (so outputs/ lands there) on the tiny data set;
    `kd.process(*args)` runs the installed command instead. Both return returncode, stdout, stderr
    and, with check=True, fail the test on a non-zero exit."""
    env = {"KD_DATA_ROOT": str(tiny_root), "HYDRA_FULL_ERROR": "0"}

    def checked(proc, args, check):
        if check and proc.returncode != 0:
            raise AssertionError(f"kd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc

    def run(*args, check=True, extra_env=None):
        return checked(run_in_process(args, tmp_path, {**env, **(extra_env or {})}), args, check)

    def process(*args, check=True, extra_env=None):
        proc = subprocess.run([KD, *args], cwd=tmp_path, env={**os.environ, **env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=300)
        return checked(proc, args, check)

    run.process, run.cwd, run.root = process, tmp_path, tiny_root
    return run


def plain_logits(checkpoint, x):
    """A checkpoint's logits in eval mode, in float64, from its weights alone (no kd code)."""
    import torch

    from kd_cli.checkpoint import load_checkpoint

    w = load_checkpoint(checkpoint)["state_dict"]
    h = x.flatten(1).double()
    layers = sorted({k.split(".")[1] for k in w if k.startswith("hidden.")}, key=int)
    for i in layers:
        h = torch.relu(h @ w[f"hidden.{i}.weight"].double().T + w[f"hidden.{i}.bias"].double())
    return h @ w["out.weight"].double().T + w["out.bias"].double()


def moved_by_hand(image, dy, dx):
    """One image [H, W] moved dy px down and dx px right, pixel by pixel, zeros where nothing
    lands: the plain second implementation the jitter is checked against."""
    import torch

    h, w = image.shape
    out = torch.zeros_like(image)
    for r in range(h):
        for c in range(w):
            if 0 <= r - dy < h and 0 <= c - dx < w:
                out[r, c] = image[r - dy, c - dx]
    return out
