"""Latent data: an image folder encoded once by a diffusers ``AutoencoderKL``, for latent diffusion (DiT).

DiT (Peebles & Xie 2023, Sec. 3.1; facebookresearch/DiT ``train.py``) trains on ``z = 0.18215 * sample of
q(z | x)`` of Stable Diffusion's VAE (``stabilityai/sd-vae-ft-ema``: 256x256x3 images -> 32x32x4 latents), drawing
``z`` afresh at every step from the encoder's Gaussian posterior of a randomly flipped image. Encoding every step
costs more than the DiT-S forward pass, so here the posterior of every image (and of its mirror image, with
``hflip``) is computed once and stored as its mean and standard deviation; :class:`LatentsDataModule` draws
``z = scale * (mean + std * eps)`` from them at every access (or ``scale * mean`` with ``sample_posterior=False``),
which is the distribution DiT trains on.

Encode a folder (``root/<class>/<images>``, labels = sorted class folders, as ``data=imagefolder``)::

    python -m lightning_diff.data.latents ROOT OUT.pt --vae stabilityai/sd-vae-ft-ema --resolution 256

and train on it with ``data=latents data.path=OUT.pt``. Samples are latents; :func:`decode_latents` turns them into
uint8 images through the same VAE (``z / scale`` into its decoder).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .imagefolder import ImageFolderDataModule
from .loading import make_loader, split_indices
from .transforms import CONTINUOUS, from_uint8, to_uint8

__all__ = ["SD_VAE_SCALE", "encode_images", "encode_folder", "decode_latents", "LatentDataset",
           "LatentsDataModule"]

SD_VAE_SCALE = 0.18215  # Stable Diffusion's latent scale (unit variance of its latents; DiT train.py, sample.py)
FORMAT = "lightning_diff.latents.v1"  # tag of the file layout written by encode_folder


@torch.no_grad()
def encode_images(images: torch.Tensor, vae, hflip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior ``q(z | x)`` of uint8 images ``[B, 3, H, W]`` under ``vae`` (a diffusers ``AutoencoderKL``):
    ``(mean, std)`` float32 ``[B, 4, H/8, W/8]`` (for sd-vae; unscaled). With ``hflip``, of the mirrored images."""
    x = from_uint8(images).to(vae.device, vae.dtype)
    dist = vae.encode(x.flip(-1) if hflip else x).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def encode_folder(root: str | os.PathLike, vae, out: str | os.PathLike, *, resolution: int = 256,
                  hflip: bool = True, batch_size: int = 32, scale_factor: float | None = None,
                  vae_name: str = "", dtype: torch.dtype = torch.float16) -> Path:
    """Encode every image of ``root/<class>/`` (center-cropped and resized to ``resolution`` as ``data=imagefolder``)
    and write ``out``: ``{"mean", "std": dtype [M, c, h, w], "labels": long [M], "num_images": N, "hflip",
    "scale_factor", "num_classes", "resolution", "vae", "format"}``, where rows ``N..2N-1`` are the mirror images
    of rows ``0..N-1`` when ``hflip`` (M = 2N), else M = N; ``scale_factor`` None: the vae's
    ``config.scaling_factor`` (sd-vae: 0.18215). Written atomically; returns ``out``."""
    scale_factor = vae.config.scaling_factor if scale_factor is None else scale_factor
    folder = ImageFolderDataModule(str(root), resolution=resolution)
    source = folder.load("train")
    loader = DataLoader(source, batch_size=batch_size, shuffle=False)
    parts = {False: ([], []), True: ([], [])}
    labels = []
    for images, batch_labels in loader:
        labels.append(batch_labels)
        for flipped in (False, True) if hflip else (False,):
            mean, std = encode_images(images, vae, hflip=flipped)
            parts[flipped][0].append(mean.to(dtype))
            parts[flipped][1].append(std.to(dtype))
    means, stds = parts[False][0] + parts[True][0], parts[False][1] + parts[True][1]
    labels = torch.cat(labels).long()
    record = {"mean": torch.cat(means), "std": torch.cat(stds), "labels": labels.repeat(2 if hflip else 1),
              "num_images": len(labels), "hflip": hflip, "scale_factor": scale_factor,
              "num_classes": folder.num_classes, "resolution": resolution, "vae": vae_name, "format": FORMAT}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(record, tmp)
    os.replace(tmp, out)
    return out


@torch.no_grad()
def decode_latents(z: torch.Tensor, vae, scale_factor: float | None = None) -> torch.Tensor:
    """Model-space latents ``[B, c, h, w]`` -> uint8 images ``[B, 3, 8h, 8w]``: ``vae.decode(z / scale)`` rounded
    as EDM writes PNGs (DiT sample.py: ``vae.decode(samples / 0.18215).sample``); ``scale_factor`` None: the
    vae's ``config.scaling_factor``."""
    scale_factor = vae.config.scaling_factor if scale_factor is None else scale_factor
    images = vae.decode((z / scale_factor).to(vae.device, vae.dtype)).sample
    return to_uint8(images.float().cpu())


class LatentDataset(Dataset):
    """Rows of a latents file as ``(z float32 [c, h, w], label long [])``, ``z = scale * (mean + std * eps)``
    (``eps`` fresh at every access from torch's generator) or ``scale * mean``; batched ``__getitems__``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, scale_factor: float,
                 sample_posterior: bool = True):
        self.mean, self.std, self.labels = mean, std, labels
        self.scale_factor, self.sample_posterior = scale_factor, sample_posterior

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        z, labels = self.__getitems__([index])
        return z[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        z = self.mean[index].float()
        if self.sample_posterior:
            z = z + self.std[index].float() * torch.randn_like(z)
        return self.scale_factor * z, self.labels[index]


class LatentsDataModule(pl.LightningDataModule):
    """A latents file of :func:`encode_folder` as ``(z, labels)`` batches (continuous data: no integer pixels,
    so no bits/dim and no uint8 samples without :func:`decode_latents`).

    Args:
        path: the file (read memory-mapped at construction for ``data_shape`` and ``num_classes``).
        batch_size, num_workers, seed: as ``ImageDataModule``.
        val_fraction: images held out (class-stratified, chosen by ``seed``) for the validation loss; their
            mirror rows are held out with them.
        hflip: use the file's mirror rows in training (needs a file encoded with ``hflip``).
        sample_posterior: draw ``z`` from the posterior at every access (DiT) or use its mean.
        vae: the AutoencoderKL of the file (a hub id or a local folder), for :attr:`decoder`; None: none.
    """

    transform = CONTINUOUS

    def __init__(self, path: str, batch_size: int = 256, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.01, hflip: bool = True, sample_posterior: bool = True,
                 pin_memory: bool = False, vae: str | None = None):
        super().__init__()
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.path={path!r} is not a file; allowed: a latents file written by "
                                    "python -m lightning_diff.data.latents ROOT OUT.pt")
        record = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if record.get("format") != FORMAT:
            raise ValueError(f"data.path={path!r} holds format {record.get('format')!r}; allowed: {FORMAT!r} "
                             "(python -m lightning_diff.data.latents)")
        if hflip and not record["hflip"]:
            raise ValueError(f"data.hflip=true but {path} was encoded without mirror images; allowed: "
                             "data.hflip=false, or encode with --hflip")
        if not 0 < val_fraction < 1:
            raise ValueError(f"latents: val_fraction={val_fraction} is not allowed; allowed: 0 < val_fraction < 1")
        self.record, self.path = record, path
        self.name = f"latents-{Path(path).stem}"
        self.data_shape = tuple(record["mean"].shape[1:])
        self.num_classes = int(record["num_classes"])
        self.scale_factor = float(record["scale_factor"])
        self.batch_size, self.num_workers, self.seed, self.pin_memory = batch_size, num_workers, seed, pin_memory
        self.val_fraction, self.hflip, self.sample_posterior = val_fraction, hflip, sample_posterior
        self.train_set: LatentDataset | None = None
        self.val_set: LatentDataset | None = None
        self.vae = vae

    @property
    def decoder(self) -> torch.nn.Module | None:
        """``VAEDecoder``: latents ``[B, *data_shape]`` -> images in [-1, 1] through ``vae`` (loaded here), the
        ``decoder`` a latent ``DiffusionModule`` samples through; None without ``vae``."""
        if self.vae is None:
            return None
        from diffusers import AutoencoderKL

        from ..networks.diffusers_wrapper import VAEDecoder

        return VAEDecoder(AutoencoderKL.from_pretrained(self.vae).eval(), self.scale_factor)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        n = int(self.record["num_images"])
        train, val = split_indices(self.record["labels"][:n], self.val_fraction, self.seed)
        if self.hflip:
            train = torch.cat([train, train + n])

        def rows(index):
            return LatentDataset(*(self.record[k][index] for k in ("mean", "std", "labels")), self.scale_factor,
                                 self.sample_posterior)

        self.train_set, self.val_set = rows(train), rows(val)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.train_set, self.batch_size, True, self.seed, self.num_workers, self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.val_set, self.batch_size, False, self.seed, self.num_workers, self.pin_memory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_diff.data.latents", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="image folder root/<class>/<images>")
    parser.add_argument("out", help="latents file to write (.pt)")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                        help="diffusers AutoencoderKL: a hub id or a local folder (DiT: stabilityai/sd-vae-ft-ema)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--no-hflip", dest="hflip", action="store_false", help="do not encode mirror images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).to(args.device).eval()
    out = encode_folder(args.root, vae, args.out, resolution=args.resolution, hflip=args.hflip,
                        batch_size=args.batch_size, vae_name=args.vae)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
