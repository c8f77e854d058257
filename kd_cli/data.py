"""The data set (MNIST, Fashion-MNIST) as tensors in memory on the run's device, its validation
split, the transfer set, and the training-time augmentations (jitter, elastic distortion).

A new augmentation also needs: its keys in conf/data/mnist.yaml and config.SCHEMA; a reader in
prepare.py (like elastic_of); a train() argument and its line in the step; passing it on in
stages._fit_and_finish, stages.train_specialists and specialists.train_specialist; stages.distill's
per_batch (cached teacher targets are for unaugmented images). Runs stopped before the change do
not resume across it: the code they ran is recorded and checked (provenance.py)."""
import hashlib
import math
import os
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import sha256_of
from .config import DATASETS
from .errors import KDError

# the four files of every data set kd reads (MNIST and its drop-in replacements), in this order
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]



def read_idx(path):
    """An IDX file as MNIST ships it, as a uint8 tensor: magic (0, 0, 0x08 = unsigned byte,
    ndim), ndim big-endian uint32 sizes, then the data. Read here rather than through
    torchvision, whose import alone took 5 s of every kd start-up."""
    data = path.read_bytes()
    ndim = data[3] if len(data) > 3 and data[:3] == b"\0\0\x08" else 0
    head = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:head]) if ndim and len(data) >= head else ()
    if not dims or len(data) != head + math.prod(dims):
        raise KDError(f"{path} is not a whole IDX file of unsigned bytes (truncated or another format); "
                      "delete it to download it again, or fix KD_DATA_ROOT")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=head).view(*dims)


def raw_files(root, name="mnist"):
    """The data set's four files, in IDX_FILES order, where torchvision keeps them:
    <root>/<MNIST or FashionMNIST>/raw."""
    raw = Path(os.path.expanduser(str(root))) / DATASETS.get(name, name) / "raw"
    return [raw / f for f in IDX_FILES]


def check_present(root, name="mnist"):
    """Refuse, saying where they belong, while any of the data set's files is missing."""
    files = raw_files(root, name)
    if not all(f.is_file() for f in files):
        folder = DATASETS.get(name, name)
        raise KDError(f"{folder} not found under {files[0].parent}; set KD_DATA_ROOT (or data.root=) to the folder "
                      f"that holds {folder}/raw, or allow data.download=true where the internet is reachable")


def fetch(root, name="mnist"):
    """Download the data set's files into root where any is missing (torchvision's downloader), or
    refuse, leaving no folder the attempt made (kd's preflight calls it before a run's folder exists)."""
    files = raw_files(root, name)
    if all(f.is_file() for f in files):
        return
    import torchvision.datasets  # only to fetch the files: its import is slow

    folder, root = DATASETS[name], Path(os.path.expanduser(str(root)))
    made = [p for p in (root, root / folder, root / folder / "raw") if not p.exists()]
    try:
        getattr(torchvision.datasets, folder)(str(root), train=True, download=True)
    except (RuntimeError, OSError) as e:
        for p in reversed(made):  # what the attempt created, if it holds nothing
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise KDError(f"could not download {folder} into {root} ({str(e).splitlines()[0]}); "
                      f"set KD_DATA_ROOT (or data.root=) to a folder that holds {folder}/raw") from None


def data_sha256(root, name="mnist", training_only=False, file_sha256=sha256_of):
    """One sha256 of the data set's four files (of their sha256s, in turn), or of its two training
    files only, or None while any is missing (the run downloads them, or says where they belong):
    what a run records it trained on. file_sha256 hashes one file (provenance's remembers each)."""
    files = raw_files(root, name)[:2] if training_only else raw_files(root, name)
    if not all(f.is_file() for f in files):
        return None
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def load_data(root, download=False, device="cpu", train_limit=None, name="mnist"):
    """Return (train_x, train_y, test_x, test_y): images as float32 [N, 28, 28] in [0, 1], of
    any data set of config.DATASETS (MNIST, Fashion-MNIST: one file format, each in its own folder)."""
    if name not in DATASETS:
        raise KDError(f"data.name must be one of {', '.join(DATASETS)}, got {name!r}")
    root = Path(os.path.expanduser(str(root)))
    files = raw_files(root, name)
    fetch(root, name) if download else check_present(root, name)
    train_images, train_labels, test_images, test_labels = (read_idx(f) for f in files)
    if train_limit is not None:
        train_images, train_labels = train_images[:train_limit], train_labels[:train_limit]

    def as_tensors(images, labels):
        return images.to(device).float().div_(255.0), labels.to(device).long()

    return (*as_tensors(train_images, train_labels), *as_tensors(test_images, test_labels))


def split_validation(x, y, val_size, seed=0):
    """Hold out `val_size` training images for choosing things that must not be chosen on the test
    set. The split has its own fixed seed, so every run (whatever its `seed`) holds out the same
    images. Returns (train_x, train_y, val_x, val_y)."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).to(x.device)
    val, keep = perm[:val_size], perm[val_size:].sort().values  # training images keep their order
    return x[keep], y[keep], x[val], y[val]


def draw_shifts(n, max_shift, device):
    """One random shift per image, as a code k in [0, (2 max_shift + 1)^2): k = row * side + column
    of the shifted image's window in the zero-padded image (k = side * max_shift + max_shift is no
    shift). Drawn from the global torch RNG, so a seed fixes it."""
    side = 2 * max_shift + 1
    return torch.randint(0, side * side, (n,), device=device)


def elastic_distort(images, scale, sigma):
    """Each image [N, H, W] resampled (bilinear, zeros outside) at its pixel positions moved by a
    random smooth field (Simard et al. 2003): uniform in [-1, 1] per pixel and direction, smoothed
    by a Gaussian of std `sigma` px (zeros beyond the border), times `scale` px. Drawn from the
    global torch RNG, anew at every call, so a seed fixes it."""
    n, h, w = images.shape
    r = math.ceil(3 * sigma)
    taps = torch.arange(-r, r + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()

    def band(size):  # the Gaussian as a [size, size] matrix: a convolution with zero padding
        i = torch.arange(size, device=images.device)
        offset = i[None, :] - i[:, None] + r
        inside = (offset >= 0) & (offset <= 2 * r)
        return torch.where(inside, kernel[offset.clamp(0, 2 * r)], torch.zeros((), device=images.device))

    field = torch.rand(n, 2, h, w, device=images.device) * 2 - 1  # (dx, dy) for every pixel
    field = band(h) @ field @ band(w).T * scale  # two small matrix products: cheaper than conv2d here
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=images.device),
                            torch.arange(w, dtype=torch.float32, device=images.device), indexing="ij")
    # grid_sample's coordinates: -1 and 1 are the centres of the corner pixels (align_corners)
    grid = torch.stack([(xs + field[:, 0]) * 2 / (w - 1) - 1, (ys + field[:, 1]) * 2 / (h - 1) - 1], dim=-1)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def shift_images(images, shifts, max_shift):
    """Each image [N, H, W] moved by its code in `shifts` (see draw_shifts), zeros filling in where
    it moves away: one gather of each image's window in the zero-padded image, so that a batch of
    100 costs a few small ops (train() shifts each batch as it comes, not the whole set each epoch)."""
    n, h, w = images.shape
    side, wide = 2 * max_shift + 1, w + 2 * max_shift
    padded = F.pad(images, (max_shift,) * 4).flatten(1)
    window = (torch.arange(h, device=images.device)[:, None] * wide + torch.arange(w, device=images.device)).flatten()
    corner = shifts // side * wide + shifts % side  # where code k's window starts in the padded image
    return padded.gather(1, corner[:, None] + window).view(n, h, w)


def shift_codes(max_shift):
    """How many jitter codes there are: every shift by up to max_shift px along each axis."""
    return (2 * max_shift + 1) ** 2


def every_shift(images, max_shift):
    """(k, the images [N, H, W] all moved by code k) for every jitter code k in turn (see
    draw_shifts; code k moves a picture by (max_shift - k // side, max_shift - k % side) px)."""
    h, w = images.shape[1:]
    side = 2 * max_shift + 1
    padded = F.pad(images, (max_shift,) * 4)
    for k in range(shift_codes(max_shift)):
        dy, dx = divmod(k, side)
        yield k, padded[:, dy:dy + h, dx:dx + w].contiguous()


def jitter(images, max_shift):
    """Shift each image [N, H, W] by its own random integer in [-max_shift, max_shift] along each
    axis, filling with zeros (draw_shifts, then shift_images). max_shift 0 returns the images.
    train() does not call it: it calls draw_shifts and shift_images itself, to hand the shift codes
    to a distilled student's targets, so a change to the training jitter belongs there."""
    if max_shift <= 0:
        return images
    return shift_images(images, draw_shifts(images.shape[0], max_shift, images.device), max_shift)


def transfer_set(x, y, exclude=(), include=None, fraction=1.0, seed=0, num_classes=10):
    """The images a student learns from: classes in `include` (all when None) minus `exclude`,
    then a stratified `fraction` of each kept class, drawn with seeded generators of its own (so the
    same subset whatever the run's seed and whichever other classes are kept; the global RNG is
    untouched). Training images keep
    their order. Returns (x, y, info) where info records the classes and the size."""
    exclude = sorted({int(c) for c in exclude})
    include = None if include is None else sorted({int(c) for c in include})
    for name, classes in (("exclude", exclude), ("include", include or [])):
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise KDError(f"data.transfer.{name} has classes {bad} outside 0..{num_classes - 1}")
    kept = [c for c in (include if include is not None else range(num_classes)) if c not in exclude]
    if not kept:
        raise KDError("data.transfer.include/exclude leave no class to train on")
    # a generator per class, its seed drawn for every class whether kept or not: a digit's subset
    # is then the same with or without another digit excluded (omit-a-class and little-data studies
    # compare the same images of the digits they share)
    class_seeds = torch.randint(2 ** 62, (num_classes,), generator=torch.Generator().manual_seed(int(seed))).tolist()
    picked = []
    for c in kept:
        idx = (y == c).nonzero().squeeze(1).cpu()
        if fraction < 1:
            take = max(1, round(fraction * idx.numel())) if idx.numel() else 0
            gen = torch.Generator().manual_seed(class_seeds[c])
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:take]]
        picked.append(idx)
    keep = torch.cat(picked).sort().values.to(x.device)
    if keep.numel() == 0:
        raise KDError("the transfer set is empty: no training image has the kept classes")
    info = {"classes": kept, "size": int(keep.numel()), "exclude": exclude, "include": include,
            "fraction": float(fraction), "seed": int(seed)}
    return x[keep], y[keep], info
