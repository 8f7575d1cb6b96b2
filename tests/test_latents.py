"""Latent data (data/latents.py) with a tiny diffusers AutoencoderKL built here: the file holds each image's (and its
mirror's) posterior exactly as the VAE gives it one image at a time, the data module draws z = scale (mean + std
eps) with standard-normal eps (or scale * mean), decoding is vae.decode(z / scale), and a DiT trains on it."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from PIL import Image

from lightning_diff.data.latents import LatentsDataModule, decode_latents, encode_folder, encode_images
from lightning_diff.data.transforms import from_uint8, to_uint8

from .helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae():
    """A 2-level AutoencoderKL (16x16x3 -> 8x8x4), random weights, scaling_factor 0.18215 (diffusers' default)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)
    assert model.config.scaling_factor == 0.18215
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of three random 20x16 RGB images (center-cropped to 16x16, then kept at 16)."""
    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(3):
            pixels = torch.randint(0, 256, (16, 20, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def latents(folder, vae, tmp_path_factory):
    return encode_folder(folder, vae, tmp_path_factory.mktemp("lat") / "lat.pt", resolution=16, batch_size=4,
                         dtype=torch.float32, vae_name="tiny")


def test_file_holds_each_images_posterior(folder, vae, latents):
    from lightning_diff.data import ImageFolderDataModule

    record = torch.load(latents, weights_only=True)
    source = ImageFolderDataModule(str(folder), resolution=16).load("train")
    assert record["num_images"] == 6 and record["mean"].shape == (12, 4, 8, 8) and record["scale_factor"] == 0.18215
    assert record["labels"].tolist() == [0, 0, 0, 1, 1, 1] * 2
    for i in range(6):
        image, _ = source[i]
        with torch.no_grad():
            dist = vae.encode(from_uint8(image[None])).latent_dist  # one image alone: no batch effects
            mirror = vae.encode(from_uint8(image[None].flip(-1))).latent_dist
        torch.testing.assert_close(record["mean"][i], dist.mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(record["std"][i], dist.std[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(record["mean"][6 + i], mirror.mean[0], rtol=1e-5, atol=1e-5)


def test_data_module_draws_from_the_posterior(latents):
    record = torch.load(latents, weights_only=True)
    dm = LatentsDataModule(str(latents), batch_size=4, val_fraction=1 / 3)
    assert (dm.data_shape, dm.num_classes, dm.name) == ((4, 8, 8), 2, "latents-lat")
    dm.setup()
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2  # 4 training images and their mirrors; 2 held out
    row = {float(m.sum()): i for i, m in enumerate(record["mean"])}  # each row's sum identifies it here
    train_rows = sorted(row[float(m.sum())] for m in dm.train_set.mean)
    val_rows = sorted(row[float(m.sum())] for m in dm.val_set.mean)
    images = [r for r in train_rows if r < 6]
    assert train_rows == images + [r + 6 for r in images]  # the mirrors of the training images, and no others
    assert sorted(images + val_rows) == list(range(6))
    train = dm.train_set
    eps = torch.cat([(train.__getitems__(list(range(8)))[0] / 0.18215 - train.mean) / train.std for _ in range(20)])
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03  # 10240 standard-normal draws
    mean_only = LatentsDataModule(str(latents), val_fraction=1 / 3, sample_posterior=False)
    mean_only.setup()
    torch.testing.assert_close(mean_only.train_set.__getitems__([0, 5])[0], 0.18215 * mean_only.train_set.mean[[0, 5]])


def test_settings_are_checked(latents, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path='nope.pt' is not a file"):
        LatentsDataModule("nope.pt")
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="holds format 'other'"):
        LatentsDataModule(str(tmp_path / "x.pt"))


def test_decoding_is_the_vae_decoder_of_z_over_scale(vae):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = to_uint8(vae.decode(z / 0.18215).sample)
    assert torch.equal(decode_latents(z, vae), expected) and expected.shape == (2, 3, 16, 16)
    mean, _ = encode_images(expected, vae)
    assert mean.shape == (2, 4, 8, 8)


def test_dit_trains_on_latents(latents, vae, tmp_path):
    """The DiT preset's recipe on the latents file (tiny DiT, 2 steps, lightning_diff.cli.train): data=latents
    data.path=...; the data module's decoder is the VAE's (data.vae=<folder>)."""
    from lightning_diff.cli.train import train

    vae.save_pretrained(tmp_path / "vae")
    cfg = compose_config("train", ["experiment=dit_xl2_imagenet256", f"data.path={latents}", "data.batch_size=4",
                                   "data.num_workers=0", "data.val_fraction=0.34", f"data.vae={tmp_path / 'vae'}",
                                   "network=dit_tiny", "network.num_classes=2", "network.out_channels=8",
                                   "global_batch_size=4", "trainer=cpu", "trainer.max_steps=2", "logger=csv",
                                   "callbacks.progress=null",
                                   "callbacks.sample_grid=null"], tmp_path / "run")
    result = train(cfg)
    assert Path(result["checkpoint"]).exists() and result["train/loss"] > 0
    decoder = hydra.utils.instantiate(cfg.data).decoder
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(to_uint8(decoder(z)), decode_latents(z, vae))
