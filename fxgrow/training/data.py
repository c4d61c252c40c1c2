"""Datasets for the trainer: scikit-learn's digits (embedded, no download) and ImageFolder
directories with timm's transforms.

Batch order is a pure function of ``(seed, epoch)`` (:class:`EpochSampler`), never of a
generator's running state, so that a run resumed at an epoch boundary sees exactly the
batches an uninterrupted run would. The sampler takes ``num_replicas``/``rank`` so that the
same order can be sharded across processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataBundle:
    """A train and a validation dataset of ``(image, label)`` pairs."""

    train: Dataset
    val: Dataset
    num_classes: int
    img_size: int
    name: str


def digits(img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) upsampled bilinearly to
    ``img_size``, repeated to 3 channels and normalised to zero mean and unit variance
    (statistics of the training split). The stratified train/validation split is fixed by
    ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if img_size < 8:
        raise DataError(f"img_size must be at least 8 for the 8x8 digits, got {img_size}")
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.long)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=raw.target
    )
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    train_idx, val_idx = torch.as_tensor(np.sort(train_idx)), torch.as_tensor(np.sort(val_idx))
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).contiguous()
    return DataBundle(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        num_classes=10,
        img_size=img_size,
        name="digits",
    )


def _load_image(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from exc


def _check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} directory {str(path)!r} does not exist")
    classes = [d for d in sorted(path.iterdir()) if d.is_dir()]
    if not classes:
        raise DataError(f"{what} directory {str(path)!r} has no class sub-directories")
    for cls in classes:
        if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in cls.rglob("*") if f.is_file()):
            raise DataError(f"class directory {str(cls)!r} holds no images ({what} data)")


def image_folder(
    root: str | os.PathLike, img_size: int = 224, *, train_dir: str = "train",
    val_dir: str = "val", auto_augment: str | None = None,
) -> DataBundle:
    """An ImageFolder dataset (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``, e.g.
    ImageNet-100 or CIFAR exported to folders) with timm's train and eval transforms
    (``timm.data.create_transform``). Both splits must list the same classes.

    Raises:
        DataError: a missing or empty directory; an unreadable image (when loaded, by path).
    """
    from timm.data import create_transform

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist")
    train_path, val_path = root / train_dir, root / val_dir
    _check_dir(train_path, "train")
    _check_dir(val_path, "val")
    from torchvision.datasets import ImageFolder

    # The loader raises DataError naming an unreadable file when that image is loaded.
    train = ImageFolder(
        str(train_path),
        transform=create_transform(img_size, is_training=True, auto_augment=auto_augment),
        loader=_load_image,
    )
    val = ImageFolder(
        str(val_path), transform=create_transform(img_size, is_training=False), loader=_load_image
    )
    if train.classes != val.classes:
        raise DataError(
            f"train and val directories under {str(root)!r} list different classes: "
            f"{train.classes} vs {val.classes}"
        )
    return DataBundle(train, val, len(train.classes), img_size, f"folder:{root}")


def load(name: str, img_size: int, *, seed: int = 0) -> DataBundle:
    """``"digits"`` or a path to an ImageFolder root."""
    if name == "digits":
        return digits(img_size=img_size, seed=seed)
    return image_folder(name, img_size=img_size)


class EpochSampler(Sampler[int]):
    """Indices of one epoch, a function of ``(seed, epoch)`` only. Call :meth:`set_epoch`
    before iterating. With ``num_replicas > 1`` each rank takes every ``num_replicas``-th
    index of the same permutation. ``tail`` says what happens when the size is not a multiple
    of ``num_replicas``: ``"pad"`` wraps around (as DistributedSampler does), ``"drop"``
    drops the last ``size % num_replicas`` indices (DistributedSampler's ``drop_last``: with
    a DataLoader of per-rank batch ``b`` and ``drop_last``, step ``k`` of the ranks together
    sees exactly batch ``k`` of a single process with batch ``num_replicas * b``), and
    ``"uneven"`` gives the first ranks one index more (evaluation, where sums are reduced)."""

    def __init__(
        self, size: int, seed: int, *, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
        tail: str = "pad",
    ) -> None:
        if size <= 0:
            raise DataError("cannot sample from an empty dataset")
        if not 0 <= rank < num_replicas:
            raise DataError(f"rank {rank} is not in [0, {num_replicas})")
        if tail not in ("pad", "drop", "uneven"):
            raise DataError(f"tail must be 'pad', 'drop' or 'uneven', got {tail!r}")
        if tail == "drop" and size < num_replicas:
            raise DataError(f"{size} samples cannot be split over {num_replicas} ranks")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank, self.tail = num_replicas, rank, tail
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.tail == "drop":
            return self.size // self.num_replicas
        if self.tail == "uneven":
            return len(range(self.rank, self.size, self.num_replicas))
        return -(-self.size // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.tail == "pad":
            total = len(self) * self.num_replicas
            order += order[: total - len(order)]
        elif self.tail == "drop":
            order = order[: len(self) * self.num_replicas]
        return iter(order[self.rank :: self.num_replicas])


def loader(
    dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
    drop_last: bool = False, num_workers: int = 0, num_replicas: int = 1, rank: int = 0,
    tail: str = "pad",
) -> DataLoader:
    """A DataLoader over an :class:`EpochSampler`; ``loader.sampler.set_epoch(e)`` selects
    the order of epoch ``e``. ``num_replicas``, ``rank`` and ``tail`` shard it across
    processes (see :class:`EpochSampler`); ``batch_size`` is then the per-rank batch."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    sampler = EpochSampler(len(dataset), seed, shuffle=shuffle, num_replicas=num_replicas,
                           rank=rank, tail=tail)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers,
    )
