"""MNIST as tensors in memory on the run's device, and the batched pixel jitter."""
import os

import torch
import torch.nn.functional as F

from .errors import KDError

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def load_mnist(root, download=False, device="cpu", train_limit=None):
    """Return (train_x, train_y, test_x, test_y): images as float32 [N, 28, 28] in [0, 1]."""
    from torchvision.datasets import MNIST  # imported here: it is slow and only this needs it

    root = os.path.expanduser(str(root))
    raw = os.path.join(root, "MNIST", "raw")
    have = all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES)
    if not have and not download:
        raise KDError(f"MNIST not found under {raw}; set KD_DATA_ROOT (or data.root=) to the folder "
                      "that holds MNIST/raw, or allow data.download=true where the internet is reachable")
    try:
        train = MNIST(root, train=True, download=download and not have)
        test = MNIST(root, train=False, download=False)
    except (RuntimeError, OSError) as e:
        raise KDError(f"could not read or download MNIST into {root} ({str(e).splitlines()[0]}); "
                      "set KD_DATA_ROOT (or data.root=) to a folder that holds MNIST/raw") from None

    def as_tensors(ds, limit=None):
        x, y = ds.data, ds.targets
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return (x.to(device).float().div_(255.0), y.to(device).long())

    return (*as_tensors(train, train_limit), *as_tensors(test))


def jitter(images, max_shift, chunk=8192):
    """Shift each image [N, H, W] by its own random integer in [-max_shift, max_shift] along each
    axis, filling with zeros. Batched gathers on the images' device, in chunks to bound the index
    memory; uses the global torch RNG so a seed fixes it."""
    if max_shift <= 0:
        return images
    return torch.cat([_jitter_chunk(c, max_shift) for c in images.split(chunk)])


def _jitter_chunk(images, s):
    n, h, w = images.shape
    padded = F.pad(images, (s, s, s, s))  # zeros come into view where an image moves away
    dev = images.device
    dy = torch.randint(0, 2 * s + 1, (n, 1, 1), device=dev)
    dx = torch.randint(0, 2 * s + 1, (n, 1, 1), device=dev)
    rows = dy + torch.arange(h, device=dev).view(1, h, 1)
    cols = dx + torch.arange(w, device=dev).view(1, 1, w)
    return padded[torch.arange(n, device=dev).view(n, 1, 1), rows, cols]
