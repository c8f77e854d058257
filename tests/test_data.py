"""Loading MNIST into tensors, and the batched jitter."""
import numpy as np
import pytest
import torch

from conftest import moved_by_hand, write_idx

from kd_cli.data import draw_shifts, elastic_distort, every_shift, jitter, load_data, shift_images, split_validation
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


@pytest.mark.parametrize("max_shift", [1, 2])
def test_each_jitter_code_moves_an_image_as_every_shift_says(max_shift):
    """Code k moves a picture by (max_shift - k // side, max_shift - k % side) px (every_shift's
    docstring): shift_images, which train() applies batch by batch, and every_shift, over which the
    teacher's logits are cached, must agree with that, and with each other, for every code."""
    torch.manual_seed(4)
    side = 2 * max_shift + 1
    images = torch.rand(side * side, 9, 7)  # not square: rows and columns cannot be swapped unseen
    codes = torch.arange(side * side)
    batch = shift_images(images, codes, max_shift)
    for k, moved in every_shift(images, max_shift):
        dy, dx = max_shift - k // side, max_shift - k % side
        assert torch.equal(batch[k], moved_by_hand(images[k], dy, dx))
        assert torch.equal(moved, torch.stack([moved_by_hand(im, dy, dx) for im in images]))
    shifts = draw_shifts(50, max_shift, "cpu")
    mixed = torch.rand(50, 9, 7)
    assert torch.equal(shift_images(mixed, shifts, max_shift),
                       torch.stack([moved_by_hand(im, max_shift - int(k) // side, max_shift - int(k) % side)
                                    for im, k in zip(mixed, shifts)]))


def test_load_data_reads_the_idx_files_exactly(tmp_path):
    rng = np.random.default_rng(3)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 30),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 7)}
    for name, a in arrays.items():
        write_idx(raw / name, a)
    tx, ty, sx, sy = load_data(tmp_path, download=False, train_limit=20)
    assert tx.dtype == torch.float32 and ty.dtype == torch.long
    assert torch.equal(tx, torch.tensor(arrays["train-images-idx3-ubyte"][:20] / 255.0, dtype=torch.float32))
    assert ty.tolist() == arrays["train-labels-idx1-ubyte"][:20].tolist()
    assert torch.equal(sx, torch.tensor(arrays["t10k-images-idx3-ubyte"] / 255.0, dtype=torch.float32))
    assert sy.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    whole = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(whole[:-1])
    with pytest.raises(KDError, match="not a whole IDX file"):
        load_data(tmp_path, download=False)


def test_missing_data_names_kd_data_root(tmp_path):
    with pytest.raises(KDError, match="KD_DATA_ROOT"):
        load_data(tmp_path, download=False)


def test_real_mnist_when_present():
    import os
    root = os.environ.get("KD_DATA_ROOT", "../shared/data")
    if not os.path.exists(os.path.join(root, "MNIST", "raw", "t10k-labels-idx1-ubyte")):
        pytest.skip("real MNIST not under KD_DATA_ROOT")
    tx, ty, sx, sy = load_data(root, download=False)
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


def plain_field(n, scale, sigma, seed):
    """Simard et al.'s displacement field written out: uniform noise in [-1, 1] (dx, dy per pixel,
    drawn as elastic_distort draws it), convolved with a normalised Gaussian of std sigma along each
    axis, zeros beyond the border, times scale."""
    torch.manual_seed(seed)
    noise = (torch.rand(n, 2, 28, 28) * 2 - 1).double()
    r = int(np.ceil(3 * sigma))
    k = torch.tensor([np.exp(-t * t / (2 * sigma * sigma)) for t in range(-r, r + 1)], dtype=torch.float64)
    k = k / k.sum()
    flat = noise.reshape(n * 2, 1, 28, 28)
    flat = torch.nn.functional.conv2d(flat, k.view(1, 1, 1, -1), padding=(0, r))
    flat = torch.nn.functional.conv2d(flat, k.view(1, 1, -1, 1), padding=(r, 0))
    return flat.view(n, 2, 28, 28) * scale


@pytest.mark.parametrize("scale, sigma", [(34.0, 4.0), (3.0, 1.5)])
def test_elastic_distortion_moves_each_pixel_by_simards_smoothed_field(scale, sigma):
    """Bilinear sampling of a ramp is exact: distorting the image whose pixel (i, j) holds j gives
    back j + dx there (and the ramp in i gives i + dy), wherever the moved point stays inside the
    image. So the field can be read off and held against the plain convolution of the same noise."""
    n = 6
    i, j = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    torch.manual_seed(7)
    moved_x = elastic_distort(j.expand(n, 28, 28).contiguous(), scale, sigma)
    torch.manual_seed(7)
    moved_y = elastic_distort(i.expand(n, 28, 28).contiguous(), scale, sigma)
    field = plain_field(n, scale, sigma, 7)
    x, y = j + field[:, 0], i + field[:, 1]
    inside = (x >= 0) & (x <= 27) & (y >= 0) & (y <= 27)
    assert inside.float().mean() > 0.5  # most points: the check covers the field
    torch.testing.assert_close((moved_x.double() - j)[inside], field[:, 0][inside], atol=1e-3, rtol=0)
    torch.testing.assert_close((moved_y.double() - i)[inside], field[:, 1][inside], atol=1e-3, rtol=0)


def test_no_elastic_distortion_leaves_the_images_and_each_call_draws_anew():
    torch.manual_seed(0)
    x = torch.rand(4, 28, 28)
    torch.testing.assert_close(elastic_distort(x, 0.0, 4.0), x)
    a, b = elastic_distort(x, 34.0, 4.0), elastic_distort(x, 34.0, 4.0)
    assert (a - b).abs().max() > 0.1
    torch.manual_seed(3)
    again = elastic_distort(x, 34.0, 4.0)
    torch.manual_seed(3)
    assert torch.equal(again, elastic_distort(x, 34.0, 4.0))
