"""Datasets for the trainer: scikit-learn's digits (embedded, no download), ImageFolder
directories with timm's transforms, and a synthetic teacher-student task with unlimited data.

Batch order is a pure function of ``(seed, epoch)`` (:class:`EpochSampler`), never of a
generator's running state, so that a run resumed at an epoch boundary sees exactly the
batches an uninterrupted run would. The sampler takes ``num_replicas``/``rank`` so that the
same order can be sharded across processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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


class TeacherSamples(Dataset):
    """``size`` random inputs (standard normal images) labelled by a fixed teacher model; with
    ``fresh``, a new draw every epoch (:meth:`set_epoch`, which :func:`loader` forwards from
    its sampler), each draw a function of ``(seed, epoch)`` only, so a resumed run sees the
    samples an uninterrupted one would. The labels are the arg-max of the teacher's logits
    minus ``offsets`` (per-class shifts that balance the classes)."""

    def __init__(
        self, teacher: torch.nn.Module, offsets: torch.Tensor, size: int, img_size: int,
        seed: int, *, fresh: bool = True, channels: int = 3,
    ) -> None:
        if size <= 0:
            raise DataError(f"the teacher-student sample size must be positive, got {size}")
        self.teacher, self.offsets, self.size, self.img_size = teacher, offsets, size, img_size
        self.seed, self.fresh, self.channels = seed, fresh, channels
        self.epoch: int | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        epoch = epoch if self.fresh else 0
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.inputs, self.labels = _teacher_draw(self.teacher, self.offsets, self.size,
                                                 self.img_size, self.channels,
                                                 self.seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.labels[index]


@torch.no_grad()
def _teacher_logits(teacher: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    was_training = teacher.training
    teacher.eval()
    try:
        return torch.cat([teacher(chunk) for chunk in inputs.split(512)])
    finally:
        teacher.train(was_training)


def _teacher_draw(
    teacher: torch.nn.Module, offsets: torch.Tensor | None, size: int, img_size: int,
    channels: int, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, channels, img_size, img_size, generator=generator)
    logits = _teacher_logits(teacher, inputs)
    if offsets is not None:
        logits = logits - offsets
    return inputs, logits.argmax(dim=-1)


def teacher_student(
    teacher: torch.nn.Module, *, num_classes: int, img_size: int, train_size: int = 2048,
    val_size: int = 1024, seed: int = 0, name: str = "teacher",
) -> DataBundle:
    """A synthetic task with unlimited data: standard normal images labelled by ``teacher``
    (a fixed, typically random, full-width model; ``num_classes`` logits). The training set
    is a fresh draw of ``train_size`` samples every epoch, so a student's capacity, not the
    data set's size, limits its accuracy; the validation set is one fixed draw. Class balance:
    each class's logit is shifted by its median over a calibration draw before the arg-max.
    All draws are functions of ``seed``. The bundle's name records ``name``, the sizes and
    the seed (a run directory's configuration then tells the tasks apart)."""
    if num_classes < 2:
        raise DataError(f"the teacher-student task needs at least 2 classes, got {num_classes}")
    if val_size <= 0:
        raise DataError(f"val_size must be positive, got {val_size}")
    calibration, _ = _teacher_draw(teacher, None, 4096, img_size, 3, seed * 1_000_003 - 2)
    logits = _teacher_logits(teacher, calibration)
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise DataError(f"the teacher gives logits of shape {tuple(logits.shape)}, expected "
                        f"(batch, {num_classes})")
    offsets = logits.median(dim=0).values
    train = TeacherSamples(teacher, offsets, train_size, img_size, seed)
    val = TeacherSamples(teacher, offsets, val_size, img_size, seed * 1_000_003 - 1, fresh=False)
    return DataBundle(train, val, num_classes, img_size,
                      f"teacher-student:{name}:train{train_size}:val{val_size}:seed{seed}")


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
    ``"uneven"`` gives the first ranks one index more (evaluation, where sums are reduced).
    ``on_epoch`` is called with the epoch by :meth:`set_epoch`."""

    def __init__(
        self, size: int, seed: int, *, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
        tail: str = "pad", on_epoch: Callable[[int], None] | None = None,
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
        self.on_epoch = on_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

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
    # A dataset that draws new samples per epoch (TeacherSamples) hears of each epoch too.
    sampler = EpochSampler(len(dataset), seed, shuffle=shuffle, num_replicas=num_replicas,
                           rank=rank, tail=tail, on_epoch=getattr(dataset, "set_epoch", None))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers,
    )
