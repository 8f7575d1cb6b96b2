"""Any folder of images (``root/<class>/<image>``), center-cropped to a square and resized."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

from .base import ImageDataModule

__all__ = ["ImageFolderDataModule", "center_crop_square"]


def center_crop_square(image: Image.Image) -> Image.Image:
    """The largest centred square of a PIL image."""
    return TF.center_crop(image, min(image.size))


class ImageFolderDataModule(ImageDataModule):
    """Images under ``root/<class>/`` (torchvision's ImageFolder: one subfolder per class, sorted names ->
    labels 0..K-1; put every image in one subfolder for unconditional data), converted to RGB, center-cropped
    to a square and resized to ``resolution`` with Lanczos filtering (as EDM's ``dataset_tool.py
    --transform=center-crop``), read lazily, in [-1, 1].

    Args:
        root: the folder.
        resolution: output height and width in pixels.
        Other arguments: see ``ImageDataModule`` (a held-out ``val_fraction`` of the images; no test split).
    """

    name = "imagefolder"

    def __init__(self, root: str, resolution: int = 64, **kwargs):
        super().__init__(**kwargs)
        if resolution < 1:
            raise ValueError(f"imagefolder: resolution={resolution} is not allowed; allowed: an integer >= 1")
        try:
            classes, _ = datasets.folder.find_classes(root)
        except FileNotFoundError:
            raise FileNotFoundError(f"imagefolder: no class folders found in root={root!r}; expected "
                                    "root/<class>/<image files> (one subfolder per class, or a single "
                                    "subfolder for unconditional data)") from None
        self.root, self.resolution = root, resolution
        # The name keys cached reference statistics: two folders must never share it.
        digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:8]
        self.name = f"imagefolder-{Path(root).resolve().name}-{digest}"
        self.data_shape = (3, resolution, resolution)
        self.num_classes = len(classes)

    def load(self, split: str) -> datasets.ImageFolder:
        pipeline = transforms.Compose([
            center_crop_square,
            transforms.Resize((self.resolution, self.resolution), transforms.InterpolationMode.LANCZOS),
            transforms.PILToTensor(),  # uint8 [3, H, W]; ImageFolder's loader already converted to RGB
        ])
        return datasets.ImageFolder(self.root, transform=pipeline)
