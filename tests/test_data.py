"""Datasets: digits (embedded), ImageFolder directories, deterministic epoch order."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from fxgrow.training import data
from fxgrow.errors import DataError


@pytest.fixture(scope="module")
def bundle():
    return data.digits(img_size=16, seed=3)


def test_digits_split_is_stratified_fixed_and_normalised(bundle):
    raw = load_digits()
    x_train, y_train = bundle.train.tensors
    x_val, y_val = bundle.val.tensors
    assert len(y_train) + len(y_val) == len(raw.target) and bundle.num_classes == 10
    assert x_train.shape[1:] == (3, 16, 16)
    assert torch.equal(x_train[:, 0], x_train[:, 2])
    # stratified: every class's share of the validation set is its share of the data, +-1
    counts = np.bincount(raw.target, minlength=10)
    val_counts = np.bincount(y_val.numpy(), minlength=10)
    assert np.all(np.abs(val_counts - counts * 0.2) <= 1)
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-4
    again = data.digits(img_size=16, seed=3)
    assert torch.equal(again.val.tensors[0], x_val) and torch.equal(again.val.tensors[1], y_val)
    other = data.digits(img_size=16, seed=4)
    assert not torch.equal(other.val.tensors[1], y_val)


def test_digits_images_are_the_upsampled_originals(bundle):
    # Independent reference: find each validation image's source by its label and pixels.
    raw = load_digits()
    originals = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16
    up = F.interpolate(originals, size=(16, 16), mode="bilinear", align_corners=False)
    x_val, y_val = bundle.val.tensors
    x0 = x_val[0, 0]
    # undo the normalisation by an affine fit against the matching original
    distances = [float(((np.corrcoef(up[i, 0].flatten(), x0.flatten())[0, 1]) - 1) ** 2)
                 for i in range(len(up))]
    best = int(np.argmin(distances))
    assert distances[best] < 1e-10 and raw.target[best] == int(y_val[0])


def test_epoch_order_depends_on_seed_and_epoch_only():
    sampler = data.EpochSampler(50, seed=7)
    sampler.set_epoch(2)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG does not matter
    again = data.EpochSampler(50, seed=7)
    again.set_epoch(2)
    assert list(again) == first and sorted(first) == list(range(50))
    again.set_epoch(3)
    assert list(again) != first
    shards = []
    for rank in range(3):
        shard = data.EpochSampler(50, seed=7, num_replicas=3, rank=rank)
        shard.set_epoch(2)
        shards.append(list(shard))
    assert all(len(s) == 17 for s in shards)
    assert set().union(*shards) == set(range(50))


def _folder(root, classes=("cat", "dog"), per_class=2, size=20):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((size, size, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def test_image_folder_uses_timm_transforms(tmp_path):
    root = _folder(tmp_path / "ds")
    bundle = data.image_folder(root, img_size=16)
    assert bundle.num_classes == 2 and len(bundle.train) == 4 and len(bundle.val) == 4
    image, label = bundle.val[2]
    assert image.shape == (3, 16, 16) and label == 1
    # timm's eval transform normalises with the ImageNet mean/std
    expected = (40 / 255 - 0.485) / 0.229  # val[2] is dog/0.png, all pixels 40
    assert abs(float(image[0, 8, 8]) - expected) < 1e-4


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-directories"):
        data.image_folder(tmp_path / "empty")
    root = _folder(tmp_path / "ds")
    (root / "train" / "cat" / "0.png").unlink()
    (root / "train" / "cat" / "1.png").unlink()
    with pytest.raises(DataError, match="cat.*holds no images"):
        data.image_folder(root)
    root = _folder(tmp_path / "broken")
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(b"not a png")
    bundle = data.image_folder(root, img_size=16)
    with pytest.raises(DataError, match="unreadable image .*dog/1.png"):
        for _ in data.loader(bundle.train, 2, shuffle=False):
            pass
    with pytest.raises(DataError):
        data.digits(val_fraction=1.5)
