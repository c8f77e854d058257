"""Shared fixtures: a tiny synthetic MNIST in torchvision's layout, and the installed `kd`."""
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

KD = str(Path(sys.executable).with_name("kd"))


def write_idx(path, array):
    """IDX as MNIST ships it: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def synthetic_digits(n, rng):
    """Learnable images: class c lights a 4x4 block at its own place, plus noise."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(labels):
        r, col = 4 + 8 * (c // 4), 3 + 6 * (c % 4)
        images[i, r:r + 4, col:col + 4] = 255
    return images, labels


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A data root with 600 training and 200 test images under MNIST/raw."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("t10k", 200)):
        x, y = synthetic_digits(n, rng)
        write_idx(raw / f"{split}-images-idx3-ubyte", x)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y)
    return root


@pytest.fixture
def kd(tmp_path, tiny_root):
    """Run the installed `kd` in tmp_path (so outputs/ lands there) on the tiny data set."""
    def run(*args, check=True):
        env = {**os.environ, "KD_DATA_ROOT": str(tiny_root), "HYDRA_FULL_ERROR": "0"}
        proc = subprocess.run([KD, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"kd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc
    run.cwd, run.root = tmp_path, tiny_root
    return run
