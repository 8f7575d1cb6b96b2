"""EDM's non-leaky augmentation (``lightning_diff.data.augment``; Karras et al. 2022, App. F.2).

Oracles: ``torch.flip`` / ``torch.rot90`` / ``F.pad(mode="reflect")`` for the pixel-exact transforms; an
analytic smooth image evaluated at the mapped positions for the affine resampling; binomial rates
``p * multiplier`` for how often each transform is applied; the inverse of the affine map read back from the
labels (applied with plain ``grid_sample``); EDM's label layout from NVlabs/edm ``train.py`` (CIFAR-10:
xflip=1e8, yflip, scale, rotate_frac, aniso, translate_frac; 9 labels); and EDM's own ``AugmentPipe`` on the
same seed when ``shared/reference/edm/training/augment.py`` is present.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_diff import formulations
from lightning_diff.data.augment import SYM6, AugmentPipe, affine_warp, rotation, scaling, translation
from lightning_diff.networks import SongUNet
from lightning_diff.training.builders import build_datamodule, build_module
from lightning_diff.training.module import DiffusionModule

from .helpers import compose_config

ROOT = Path(__file__).resolve().parent.parent
EDM_REFERENCE = ROOT.parent / "shared" / "reference" / "edm"
# NVlabs/edm train.py, --augment=0.12: the pipe of its CIFAR-10 runs (network augment_dim=9).
EDM_CIFAR10 = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
# Label columns of each transform in that pipe (NVlabs/edm training/augment.py appends them in this order).
EDM_CIFAR10_COLUMNS = {"xflip": [0], "yflip": [1], "scale": [2], "rotate_frac": [3, 4], "aniso": [5, 6],
                       "translate_frac": [7, 8]}


def smooth_field(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A band-limited 3-channel test pattern at positions ``x``, ``y`` (pixels), periods >= 15 px."""
    return torch.stack([torch.sin(0.35 * x + 0.2 * y + 0.2), torch.cos(0.25 * x - 0.3 * y),
                        torch.sin(0.2 * x) * torch.cos(0.15 * y)])


def centred_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre positions ``(x, y)`` ``[size, size]`` measured from the image centre (x right, y down)."""
    c = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    return x, y


def smooth_images(n: int, size: int = 32) -> torch.Tensor:
    """``[n, 3, size, size]``: the smooth pattern, each image with its own offset."""
    x, y = centred_grid(size)
    return torch.stack([smooth_field(x + 3 * i, y - 2 * i) for i in range(n)])


def random_images(n: int, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(n))


def only(name: str, multiplier: float = 1.0, **spreads) -> AugmentPipe:
    """A pipe with one transform, applied with probability 1 (``p=1``)."""
    return AugmentPipe(p=1.0, **{name: multiplier}, **spreads)


# --- the resampling filter and the affine warp ----------------------------------------------------------------
def test_sym6_is_an_orthonormal_lowpass():
    """Daubechies' conditions: sum h = sqrt 2 (low-pass), sum h[k] h[k + 2 m] = delta_m (orthonormal: upsampling
    then downsampling with it is the identity)."""
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert h.sum().item() == pytest.approx(math.sqrt(2), abs=1e-12)
    for m in range(len(h) // 2):
        assert (h[: len(h) - 2 * m] * h[2 * m:]).sum().item() == pytest.approx(float(m == 0), abs=1e-12)


def test_identity_warp_returns_the_images():
    images = random_images(4, size=16)
    torch.testing.assert_close(affine_warp(images, torch.eye(3).expand(4, 3, 3)), images, atol=2e-6, rtol=0)


@pytest.mark.parametrize("angle,scale,shift", [(math.pi / 2, 1.0, 0.0), (math.pi, 1.0, 0.0), (0.5, 1.2, 0.3),
                                               (2.0, 0.8, -1.7), (0.0, 1.0, 0.5)])
def test_affine_warp_samples_the_image_at_the_mapped_positions(angle, scale, shift):
    """Output pixel (x, y) = the smooth pattern at ``inverse (x, y)`` (inside, away from mirrored borders).

    Tolerance 0.06 of the amplitude: EDM's filter centring leaves turned content up to 0.1 px off (measured
    0.052 for the half turn, 0.003 for the pure shift); a quarter-pixel error in the centre measures 0.09-0.14."""
    size = 32
    x, y = centred_grid(size)
    images = smooth_field(x, y)[None]
    inverse = translation(torch.tensor([shift]), torch.tensor([-shift / 2])) @ rotation(torch.tensor([angle])) \
        @ scaling(torch.tensor([scale]), torch.tensor([scale]))
    source = torch.stack([x, y, torch.ones_like(x)], dim=-1) @ inverse[0].T
    expected = smooth_field(source[..., 0], source[..., 1])[None]
    inside = (source[..., :2].abs() < (size - 1) / 2 - 3).all(dim=-1)
    warped = affine_warp(images, inverse)
    error = (warped - expected)[..., inside].abs().max().item()
    assert error < 0.06, error
    # Controls: the pattern a quarter pixel off, and the map turning the other way, do not pass.
    off = smooth_field(source[..., 0] + 0.25, source[..., 1] + 0.25)[None]
    assert (warped - off)[..., inside].abs().max().item() > 0.06
    if 0 < angle < math.pi:
        turned_back = torch.stack([x, y, torch.ones_like(x)], dim=-1) @ inverse[0]  # the transposed map
        wrong = smooth_field(turned_back[..., 0], turned_back[..., 1])[None]
        assert (warped - wrong)[..., inside].abs().max().item() > 0.1


# --- pixel-exact transforms -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dim", [("xflip", 3), ("yflip", 2)])
def test_flips_are_exact_and_labelled(name, dim):
    images = random_images(200)
    out, labels = only(name)(images)
    assert labels.shape == (200, 1)
    flipped = labels[:, 0] == 1
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    assert 60 < flipped.sum() < 140  # an applied flip flips half of the time
    assert torch.equal(out[flipped], images[flipped].flip(dim))
    assert torch.equal(out[~flipped], images[~flipped])


def test_quarter_turns_are_rot90():
    """rotate_int labels ``[k in (1, 2), k in (2, 3)]`` (EDM) for ``torch.rot90(k)``."""
    images = random_images(200)
    out, labels = only("rotate_int")(images)
    decode = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    turns = [decode[tuple(int(v) for v in row)] for row in labels.tolist()]
    assert sorted(set(turns)) == [0, 1, 2, 3]
    for i, k in enumerate(turns):
        assert torch.equal(out[i], images[i].rot90(k, dims=(1, 2)))


def test_integer_translation_is_a_mirrored_shift():
    """out[y, x] = in[y + ty, x - tx] with the image mirrored about its edge pixels (``F.pad`` reflect)."""
    size, reach = 16, 0.25
    images = random_images(100, size=size)
    out, labels = only("translate_int", translate_int_max=reach)(images)
    shifts = labels * size * reach
    torch.testing.assert_close(shifts, shifts.round(), atol=1e-5, rtol=0)  # integer pixels
    shifts = shifts.round().long()
    assert shifts.abs().max() == size * reach and (shifts != 0).any(dim=1).float().mean() > 0.8
    pad = size - 1
    padded = F.pad(images, [pad] * 4, mode="reflect")
    for i, (tx, ty) in enumerate(shifts.tolist()):
        expected = padded[i, :, pad + ty: pad + ty + size, pad - tx: pad - tx + size]
        assert torch.equal(out[i], expected)


# --- non-leaky labels: what is applied, how often, and what the labels say ------------------------------------
def test_p0_leaves_images_unchanged_and_labels_zero():
    images = random_images(64, size=16)
    out, labels = AugmentPipe(p=0.0, **EDM_CIFAR10)(images)
    assert torch.equal(out, images)
    assert labels.shape == (64, 9) and not labels.any()


def test_edm_cifar10_label_layout():
    """One transform at a time (the others kept in the layout with a negligible multiplier): only its
    columns are non-zero, at the positions of EDM's 9 labels."""
    images = random_images(64, size=16)
    for name, columns in EDM_CIFAR10_COLUMNS.items():
        pipe = AugmentPipe(p=1.0, **{k: (1.0 if k == name else 1e-12) for k in EDM_CIFAR10})
        assert pipe.label_dim == 9
        _, labels = pipe(images)
        nonzero = labels.ne(0).any(dim=0).nonzero().flatten().tolist()
        assert nonzero == columns, name


@pytest.mark.parametrize("name,multiplier,columns,flip", [
    ("xflip", 1e8, [0], True), ("yflip", 1.0, [1], True), ("scale", 1.0, [2], False),
    ("rotate_frac", 2.0, [3, 4], False), ("aniso", 0.5, [5, 6], False), ("translate_frac", 1.0, [7, 8], False),
])
def test_each_transform_is_applied_at_rate_p_times_multiplier(name, multiplier, columns, flip):
    """Fraction of samples with non-zero labels = min(p x multiplier, 1) (a flip: half of that), within 5
    binomial standard deviations; the other transforms run too (EDM's CIFAR-10 pipe, p=0.3)."""
    n, p = 3000, 0.3
    pipe = AugmentPipe(p=p, **{**EDM_CIFAR10, name: multiplier})
    _, labels = pipe(random_images(n, channels=1))
    rate = min(p * multiplier, 1.0) * (0.5 if flip else 1.0)
    observed = labels[:, columns].ne(0).any(dim=1).float().mean().item()
    assert abs(observed - rate) < 5 * math.sqrt(rate * (1 - rate) / n) + 1e-9, (observed, rate)


def test_labels_are_zero_exactly_when_the_image_is_unchanged():
    """Each transform alone at p=0.5: a sample is untouched if and only if its labels are all zero."""
    images = random_images(300)
    for name in ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso", "translate_frac"):
        out, labels = AugmentPipe(p=0.5, **{name: 1.0}, translate_int_max=0.25)(images)
        unchanged = (out == images).flatten(1).all(dim=1)
        assert torch.equal(unchanged, ~labels.ne(0).any(dim=1)), name
        assert 0.2 < unchanged.float().mean() < 0.9, name


def test_applied_parameters_follow_their_distributions():
    """scale / aniso / translate_frac labels ~ N(0, 1), rotate_frac angle ~ U(-pi, pi), when applied."""
    n = 4000
    _, labels = AugmentPipe(p=1.0, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                            aniso_rotate_prob=0.0)(random_images(n, channels=1))
    for column in (0, 3, 5, 6):  # scale w, aniso w (direction fixed: [w, 0]), translate tx, ty
        values = labels[:, column]
        assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.05, column
    assert not labels[:, 4].any()  # aniso_rotate_prob=0: the stretch stays along x
    angle = torch.atan2(labels[:, 2], labels[:, 1] + 1)
    assert abs(angle.mean()) < 0.15 and abs(angle.var() - math.pi**2 / 3) < 0.2


def test_labels_give_the_inverse_map():
    """Warp each augmented image back with the inverse of the affine map rebuilt from its labels (plain
    bilinear ``grid_sample``): the original image comes back inside the image. The rebuilt map follows the
    label meanings in ``AugmentPipe``'s docstring (EDM's): scale 2^(0.2 w), rotation(-a), stretch 2^(0.2 w)
    along x (aniso_rotate_prob=0: EDM's aniso labels do not fix the direction's sign), shift
    (tx, ty) x 0.125 x side."""
    size, n = 32, 16
    images = smooth_images(n, size)
    pipe = AugmentPipe(p=1.0, scale=1, rotate_frac=1, aniso=1, translate_frac=1, aniso_rotate_prob=0.0)
    out, labels = pipe(images)
    w_scale, cos_a, sin_a, w_aniso, _, tx, ty = labels.double().unbind(1)
    angle = torch.atan2(sin_a, cos_a + 1)

    def restored(sign=1, step=0.125):
        scale, stretch = 2 ** (0.2 * w_scale), 2 ** (0.2 * w_aniso)  # scale first, then turn, stretch, shift
        forward = translation(tx * size * step, ty * size * step) @ scaling(stretch, 1 / stretch) \
            @ rotation(-sign * angle) @ scaling(scale, scale)
        x, y = centred_grid(size)
        points = torch.stack([x, y, torch.ones_like(x)], dim=-1).double()
        where = torch.einsum("nij,hwj->nhwi", forward, points)[..., :2]  # original pixel -> augmented position
        grid = (2 * (where + (size - 1) / 2) + 1) / size - 1
        back = F.grid_sample(out, grid.float(), mode="bilinear", align_corners=False)
        interior = (size - 1) / 2 - 3  # away from the mirrored borders of both images
        inside = (where.abs() < interior).all(dim=-1) & (points[..., :2].abs() < interior).all(dim=-1)
        inside = inside[:, None].expand_as(back)
        return (back - images)[inside].abs()

    error = restored()
    assert error.numel() > n * 3 * 100 and error.max() < 0.1, error.max()  # measured 0.059
    # Controls: the rotation read the other way round, or the shift read with step 0.1, do not restore.
    assert restored(sign=-1).max() > 0.5 and restored(step=0.1).max() > 0.2


# --- EDM's own pipe on the same seed (when the reference file is there) ---------------------------------------
def test_matches_edm_augment_pipe():
    if not (EDM_REFERENCE / "training" / "augment.py").exists():
        pytest.skip(f"{EDM_REFERENCE}/training/augment.py is absent (copy NVlabs/edm training/augment.py there)")
    sys.path.insert(0, str(EDM_REFERENCE))
    try:
        from training.augment import AugmentPipe as EDMAugmentPipe
    finally:
        sys.path.remove(str(EDM_REFERENCE))
    images = smooth_images(32) + 0.1 * torch.randn(32, 3, 32, 32)
    settings = [(0.12, EDM_CIFAR10), (1.0, EDM_CIFAR10), (0.5, dict(EDM_CIFAR10, rotate_int=1, translate_int=1))]
    for p, multipliers in settings:
        torch.manual_seed(1)
        expected, expected_labels = EDMAugmentPipe(p=p, **multipliers)(images)
        torch.manual_seed(1)
        out, labels = AugmentPipe(p=p, **multipliers)(images)
        torch.testing.assert_close(labels, expected_labels, atol=1e-6, rtol=0)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


# --- the run: build-time consistency, training only, sampling without labels ---------------------------------
def tiny_song_unet(augment_dim: int) -> SongUNet:
    return SongUNet(in_channels=1, resolution=8, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                    attn_resolutions=[], augment_dim=augment_dim)


def test_network_augment_dim_must_match_the_pipe(tmp_path):
    base = ["data=digits", "network=ddpmpp_tiny"]
    cases = [(["network.augment_dim=9"], r"network\.augment_dim=9 .*augment=null"),
             (["network.augment_dim=5", "augment=edm"], r"network\.augment_dim=5 .*gives 9 labels"),
             (["augment=edm"], r"network\.augment_dim=0 .*gives 9 labels"),
             (["network=tiny_unet", "augment=edm"], r"network\.augment_dim=0 .*gives 9 labels")]
    for overrides, message in cases:
        cfg = compose_config("train", base + overrides, tmp_path)
        with pytest.raises(ValueError, match=message):
            build_module(cfg, build_datamodule(cfg))
    cfg = compose_config("train", base + ["network.augment_dim=9", "augment=edm"], tmp_path)
    module = build_module(cfg, build_datamodule(cfg))
    assert module.augment_pipe.label_dim == 9 and module.augment_pipe.p == 0.12


@pytest.mark.parametrize("network", ["ddpmpp_cifar10", "ncsnpp_cifar10"])
def test_edm_cifar10_networks_take_the_edm_pipe(network, tmp_path):
    cfg = compose_config("train", [f"network={network}", "augment=edm"], tmp_path)
    pipe = AugmentPipe(**{k: v for k, v in cfg.augment.items() if k != "_target_"})
    assert cfg.network.augment_dim == pipe.label_dim == 9
    assert pipe.p == 0.12 and pipe.enabled == tuple(EDM_CIFAR10_COLUMNS)


def test_only_training_sees_augmentation():
    """training_step augments and passes [B, 9] labels; validation_step and sample() pass none (EDM's
    generate.py calls the network without augment_labels)."""
    network = tiny_song_unet(augment_dim=9)
    seen = []
    network.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("augment_labels")),
                                      with_kwargs=True)
    pipe = AugmentPipe(p=1.0, **EDM_CIFAR10)
    module = DiffusionModule(network, formulations.get("edm"), augment_pipe=pipe)
    batch = (random_images(6, channels=1), torch.zeros(6, dtype=torch.long))
    module.training_step(batch, 0)
    assert len(seen) == 1 and seen[0].shape == (6, 9) and seen[0].any()
    seen.clear()
    module.validation_step(batch, 0)
    module.sample(range(2), sigmas=torch.tensor([80.0, 1.0, 0.0]), data_shape=(1, 8, 8))
    assert seen and all(labels is None for labels in seen)
