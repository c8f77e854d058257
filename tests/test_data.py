"""Loading MNIST into tensors, and the batched jitter."""
import numpy as np
import pytest
import torch

from conftest import write_idx

from kd_cli.data import jitter, load_mnist, split_validation
from kd_cli.errors import KDError


def test_jitter_moves_each_image_by_at_most_two_pixels_with_zero_fill():
    torch.manual_seed(0)
    n = 2000
    images = torch.zeros(n, 28, 28)
    images[:, 14, 14] = 1.0  # one lit pixel per image: where it lands is the shift
    out = jitter(images, 2)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out.flatten(1).sum(1), torch.ones(n))  # moved whole, nothing else lit
    where = out.flatten(1).argmax(1)
    dy, dx = where // 28 - 14, where % 28 - 14
    assert dy.abs().max() == 2 and dx.abs().max() == 2
    seen = set(zip(dy.tolist(), dx.tolist()))
    assert len(seen) == 25  # every shift in -2..2 x -2..2 is drawn


def test_jitter_shifts_content_and_fills_with_zeros_at_the_border():
    torch.manual_seed(1)
    images = torch.ones(500, 28, 28)
    out = jitter(images, 2)
    lost = 784 - out.flatten(1).sum(1)  # pixels pushed out = |dy|*28 + |dx|*28 - |dy||dx|
    assert lost.max() == 2 * 28 + 2 * 28 - 4 and lost.min() == 0
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_jitter_is_fresh_per_call_and_seeded():
    images = torch.rand(64, 28, 28)
    torch.manual_seed(2)
    a, b = jitter(images, 2), jitter(images, 2)
    torch.manual_seed(2)
    assert torch.equal(jitter(images, 2), a) and not torch.equal(a, b)
    assert jitter(images, 0) is images


def test_load_mnist_reads_the_idx_files_exactly(tmp_path):
    rng = np.random.default_rng(3)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 30),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 7)}
    for name, a in arrays.items():
        write_idx(raw / name, a)
    tx, ty, sx, sy = load_mnist(tmp_path, download=False, train_limit=20)
    assert tx.dtype == torch.float32 and ty.dtype == torch.long
    assert torch.equal(tx, torch.tensor(arrays["train-images-idx3-ubyte"][:20] / 255.0, dtype=torch.float32))
    assert ty.tolist() == arrays["train-labels-idx1-ubyte"][:20].tolist()
    assert torch.equal(sx, torch.tensor(arrays["t10k-images-idx3-ubyte"] / 255.0, dtype=torch.float32))
    assert sy.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    whole = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(whole[:-1])
    with pytest.raises(KDError, match="not a whole IDX file"):
        load_mnist(tmp_path, download=False)


def test_missing_data_names_kd_data_root(tmp_path):
    with pytest.raises(KDError, match="KD_DATA_ROOT"):
        load_mnist(tmp_path, download=False)


def test_real_mnist_when_present():
    import os
    root = os.environ.get("KD_DATA_ROOT", "../shared/data")
    if not os.path.exists(os.path.join(root, "MNIST", "raw", "t10k-labels-idx1-ubyte")):
        pytest.skip("real MNIST not under KD_DATA_ROOT")
    tx, ty, sx, sy = load_mnist(root, download=False)
    assert tx.shape == (60000, 28, 28) and sx.shape == (10000, 28, 28)
    assert int((sy == 3).sum()) == 1010  # the count the paper's omitted-3 experiment uses


def test_validation_split_is_fixed_disjoint_and_complete():
    x = torch.arange(100).float().view(100, 1, 1).expand(100, 28, 28)
    y = torch.arange(100)
    tx, ty, vx, vy = split_validation(x, y, 20)
    assert len(vy) == 20 and len(ty) == 80
    assert sorted(ty.tolist() + vy.tolist()) == list(range(100))
    assert torch.equal(tx[:, 0, 0].long(), ty) and torch.equal(vx[:, 0, 0].long(), vy)
    torch.manual_seed(123)  # the run's seed does not move the split
    assert torch.equal(split_validation(x, y, 20)[3], vy)


def test_the_validation_split_is_a_random_sample_not_the_first_images():
    # training sets often come sorted (MNIST is not, a user's may be): 100 of 1000 images sorted by
    # class must not all be one or two classes; a random 100 of 10 classes of 100 hold nearly all 10
    x, y = torch.arange(1000.0).view(1000, 1, 1), torch.arange(1000) // 100
    _, _, val_x, val_y = split_validation(x, y, 100)
    assert len(set(val_y.tolist())) >= 8
