"""EDM's non-leaky augmentation: geometric transforms the network is told about (Karras et al. 2022, App. F.2).

Each training image goes through a chain of random transforms (flips, 90-degree rotations, integer
translation, then one affine map: isotropic scaling, then rotation, then anisotropic scaling, then fractional
translation of the content), each applied with probability ``min(p * multiplier, 1)``. The parameters of
what was applied come back as ``augment_labels`` ``[N, label_dim]`` and condition the network
(``augment_dim``); a transform not applied gives zeros. Sampling passes no labels (the network's zero
embedding = "not augmented"), so the transforms do not leak into generated images.

The label layout is EDM's (NVlabs/edm ``training/augment.py``), so that a network trained by EDM is
conditioned the same way: one group per enabled transform, in the order of ``TRANSFORMS``, sizes
``LABEL_SIZES``. EDM's CIFAR-10 pipe (``configs/augment/edm.yaml``: xflip, yflip, scale, rotate_frac, aniso,
translate_frac) gives the 9 labels ``[xflip, yflip, scale, cos(a) - 1, sin(a), w cos(r), w sin(r), tx, ty]``.
The random numbers are drawn in EDM's order too: with the same seed the labels equal EDM's.

Not here: EDM's colour transforms (brightness, contrast, lumaflip, hue, saturation), which none of EDM's
published runs enabled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AugmentPipe", "check_augment_dim", "TRANSFORMS", "LABEL_SIZES", "affine_warp", "rotation", "scaling",
           "translation", "SYM6"]

# Transforms in the order they are applied and labelled, and the number of labels each adds when enabled.
TRANSFORMS = ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso", "translate_frac")
LABEL_SIZES = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1, "rotate_frac": 2,
               "aniso": 2, "translate_frac": 2}

# Symlet-6 orthonormal low-pass filter (Daubechies 1992, "least asymmetric"; PyWavelets ``sym6`` dec_lo):
# the anti-aliasing filter of EDM's resampling. Orthonormal: upsampling with it then downsampling with it
# is exactly the identity.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


# --- 3x3 homogeneous matrices on pixel coordinates (x right, y down), one per sample -----------------------
def _matrix(rows) -> torch.Tensor:
    """Stack a 3x3 nested list of ``[N]`` tensors (or numbers) into ``[N, 3, 3]`` (float32 unless float64)."""
    ref = next(e for row in rows for e in row if isinstance(e, torch.Tensor))
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    return torch.stack([torch.stack([torch.as_tensor(e, dtype=dtype, device=ref.device).expand_as(ref)
                                     for e in row], dim=-1) for row in rows], dim=-2)


def rotation(theta: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` rotation by ``theta`` ``[N]`` radians: ``(x, y) -> (x cos - y sin, x sin + y cos)``."""
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` scaling ``(x, y) -> (sx x, sy y)``."""
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` translation ``(x, y) -> (x + tx, y + ty)`` (pixels)."""
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


# --- band-limited affine resampling --------------------------------------------------------------------------
def _depthwise(x: torch.Tensor, taps: torch.Tensor, dim: int, up: bool, pad: int = 0) -> torch.Tensor:
    """Filter every channel of ``x`` ``[N, C, H, W]`` along ``dim`` (2 or 3) with stride 2: upsampling
    (``up``: ``y[k] = sum_j x[j] taps[k + pad - 2 j]``) or downsampling (``y[m] = sum_i x[2 m + i] taps[i]``)."""
    channels = x.shape[1]
    shape = (channels, 1, len(taps), 1) if dim == 2 else (channels, 1, 1, len(taps))
    weight = taps.to(x.dtype).reshape(1, 1, -1).expand(channels, 1, -1).reshape(shape)
    stride = (2, 1) if dim == 2 else (1, 2)
    if up:
        return F.conv_transpose2d(x, weight, stride=stride, padding=(pad, 0) if dim == 2 else (0, pad),
                                  groups=channels)
    return F.conv2d(x, weight, stride=stride, groups=channels)


def affine_warp(images: torch.Tensor, inverse: torch.Tensor, taps=SYM6) -> torch.Tensor:
    """Resample ``images`` ``[N, C, H, W]`` under per-sample affine maps, without aliasing.

    Args:
        images: float images.
        inverse: ``[N, 3, 3]`` maps each output pixel position to the input position it reads, both in
            pixels from the image centre (x right, y down): output ``(x, y)`` = input at ``inverse (x, y)``.
        taps: an orthonormal low-pass filter (``sum taps = sqrt 2``).
    Returns:
        ``[N, C, H, W]``, images' dtype. Outside the image the input is mirrored about its edge pixels
        (torch's ``reflect`` padding, at most one image size; zeros beyond). The identity map returns the
        images unchanged (to float rounding).

    EDM's recipe (NVlabs/edm ``training/augment.py``): upsample 2x with the low-pass, sample bilinearly,
    low-pass and downsample 2x. Here the 2x output grid is built directly on the pixel positions the
    stride-2 low-pass reads, so there is no crop; the reflection margin is the same per batch.
    """
    N, C, H, W = images.shape
    taps = torch.as_tensor(taps, dtype=torch.float64, device=images.device)
    # The filter's centre is taken at its peak tap, so that 2x-grid index k sits at pixel k / 2 (EDM's choice,
    # kept so that the images equal EDM's). sym6's centroid lies 0.098 taps after its peak: content that is
    # turned comes out up to 0.1 px off (0.05 px per filter pass; a half turn of a pattern of 15 px period is
    # off by 0.05 of its amplitude, 0.005 with the centre at the centroid).
    peak = int(taps.abs().argmax())
    length = len(taps)
    # Output samples on the 2x grid: pixel positions (k - peak) / 2 for the 2 n + length - 2 indices k that a
    # stride-2, ``length``-tap filter reads to give n pixels; centred on the image.
    xs = (torch.arange(2 * W + length - 2, device=images.device) - peak) / 2 - (W - 1) / 2
    ys = (torch.arange(2 * H + length - 2, device=images.device) - peak) / 2 - (H - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).to(inverse.dtype)
    source = torch.einsum("nij,hwj->nhwi", inverse[:, :2], points)  # [N, Hs, Ws, 2] centred input positions
    px, py = source[..., 0] + (W - 1) / 2, source[..., 1] + (H - 1) / 2  # input pixel positions

    # Mirror the image far enough for every point and the filter's reach (torch's reflect allows size - 1).
    reach = length // 2
    left, right = (min(max(math.ceil(v) + reach, 0), W - 1) for v in (-px.min().item(), px.max().item() - W + 1))
    top, bottom = (min(max(math.ceil(v) + reach, 0), H - 1) for v in (-py.min().item(), py.max().item() - H + 1))
    padded = F.pad(images, [left, right, top, bottom], mode="reflect")

    # 2x upsampling: zero insertion + low-pass with gain 2 per axis (taps * sqrt 2); index k <-> pixel k / 2.
    up_taps = taps * math.sqrt(2)
    up = _depthwise(_depthwise(padded, up_taps, 3, up=True, pad=peak), up_taps, 2, up=True, pad=peak)
    # grid_sample's normalised coordinate of 2x-grid index k (align_corners=False): (2 k + 1) / size - 1.
    grid = torch.stack([(4 * (px + left) + 1) / up.shape[3] - 1, (4 * (py + top) + 1) / up.shape[2] - 1], dim=-1)
    sampled = F.grid_sample(up, grid.to(up.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    down_taps = taps / math.sqrt(2)  # unit gain per axis
    return _depthwise(_depthwise(sampled, down_taps, 3, up=False), down_taps, 2, up=False)


# --- pixel-exact transforms ---------------------------------------------------------------------------------
def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices mirrored about the edge pixels into ``[0, size)`` (torch's ``reflect`` padding, period 2 size - 2)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * size - 2
    index = index.remainder(period)
    return torch.where(index < size, index, period - index)


def _shift(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Integer translation with mirrored borders, EDM's convention: ``out[y, x] = in[y + ty, x - tx]``
    (``+tx`` moves the content right, ``+ty`` moves it up); ``tx``, ``ty`` ``[N]`` long."""
    N, C, H, W = images.shape
    rows = _reflect(torch.arange(H, device=images.device) + ty[:, None], H)  # [N, H]
    cols = _reflect(torch.arange(W, device=images.device) - tx[:, None], W)  # [N, W]
    images = images.gather(2, rows[:, None, :, None].expand(N, C, H, W))
    return images.gather(3, cols[:, None, None, :].expand(N, C, H, W))


def _rot90(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """``torch.rot90(images[i], quarter_turns[i], dims=(1, 2))`` for each sample (square images)."""
    out = images
    for k in (1, 2, 3):
        out = torch.where((quarter_turns == k)[:, None, None, None], images.rot90(k, dims=(2, 3)), out)
    return out


class _Draws:
    """The random numbers of one batch of ``n`` samples, drawn from ``generator`` on ``device``."""

    def __init__(self, n: int, generator: torch.Generator | None, device):
        self.n, self.generator, self.device = n, generator, device

    def uniform(self, *lead: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        u = torch.rand(*lead, self.n, generator=self.generator, device=self.device)
        return u * (high - low) + low

    def normal(self, *lead: int) -> torch.Tensor:
        return torch.randn(*lead, self.n, generator=self.generator, device=self.device)

    def integers(self, high: int) -> torch.Tensor:
        return torch.randint(high, (self.n,), generator=self.generator, device=self.device)

    def gate(self, value: torch.Tensor, probability: float) -> torch.Tensor:
        """``value`` (``[..., n]``) where a uniform draw per sample is below ``probability``, else 0."""
        keep = self.uniform() < probability
        return torch.where(keep, value, torch.zeros_like(value))


class AugmentPipe:
    """EDM's non-leaky augmentation pipe: ``pipe(images) -> (augmented images, augment_labels)``.

    Args:
        p: overall probability; transform T is applied to a sample with probability ``min(p * T, 1)``
            (EDM CIFAR-10: ``p=0.12``).
        xflip, yflip, rotate_int, translate_int, scale, rotate_frac, aniso, translate_frac: probability
            multipliers; 0 disables the transform and drops its labels. An applied flip or quarter turn is
            itself random (a flip happens with probability 1/2 when applied), so EDM's ``xflip=1e8`` means
            "x-flip half of the images, always labelled".
        the rest: the distributions of the applied parameters, keyword defaults as in EDM.

    Labels per enabled transform, in ``TRANSFORMS`` order (float32, zeros when not applied; positions in
    pixels from the image centre, x right, y down):
        - xflip, yflip: 1 if flipped.
        - rotate_int: ``[k in (1, 2), k in (2, 3)]`` for ``k`` quarter turns in ``torch.rot90``'s direction.
        - translate_int: ``[tx / (W translate_int_max), ty / (H translate_int_max)]`` for a shift by integer
          pixels ``tx`` right and ``ty`` *up* (EDM's convention).
        - scale: ``w``; the content is scaled by ``2^(w scale_std)``.
        - rotate_frac: ``[cos a - 1, sin a]``; the content is turned by ``rotation(-a)``.
        - aniso: ``[w cos r, w sin r]``; the content is stretched by ``2^(w aniso_std)`` along the direction at
          angle ``-r`` and squeezed by as much across it. As in EDM, the labels do not tell ``(w, r)`` from
          ``(-w, r + pi)``.
        - translate_frac: ``[tx, ty]``; the content is shifted by ``tx W translate_frac_std`` right and
          ``ty H translate_frac_std`` down.
    The four affine transforms act on the content in that order (scale, turn, stretch, shift), after the
    flips, quarter turns and integer shift.
    """

    def __init__(
        self,
        p: float = 1.0,
        xflip: float = 0.0,
        yflip: float = 0.0,
        rotate_int: float = 0.0,
        translate_int: float = 0.0,
        scale: float = 0.0,
        rotate_frac: float = 0.0,
        aniso: float = 0.0,
        translate_frac: float = 0.0,
        translate_int_max: float = 0.125,  # Largest integer translation, a fraction of the image side.
        scale_std: float = 0.2,  # Standard deviation of log2 of the isotropic scale.
        rotate_frac_max: float = 1.0,  # Largest fractional rotation, a fraction of half a turn (1 = any angle).
        aniso_std: float = 0.2,  # Standard deviation of log2 of the anisotropic stretch.
        aniso_rotate_prob: float = 0.5,  # Probability that the stretch direction is random (else along x).
        translate_frac_std: float = 0.125,  # Standard deviation of the fractional shift, a fraction of the side.
    ):
        if not 0 <= p <= 1:
            raise ValueError(f"augment.p={p} is invalid; allowed: 0 <= p <= 1")
        if not 0 <= aniso_rotate_prob <= 1:
            raise ValueError(f"augment.aniso_rotate_prob={aniso_rotate_prob} is invalid; allowed: 0 <= value <= 1")
        multipliers = dict(xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int,
                           scale=scale, rotate_frac=rotate_frac, aniso=aniso, translate_frac=translate_frac)
        spreads = dict(translate_int_max=translate_int_max, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                       aniso_std=aniso_std, translate_frac_std=translate_frac_std)
        for name, value in {**multipliers, **spreads}.items():
            if not value >= 0:
                raise ValueError(f"augment.{name}={value} is invalid; allowed: a number >= 0")
        self.p = float(p)
        self.multipliers = {name: float(value) for name, value in multipliers.items()}
        self.translate_int_max, self.translate_frac_std = float(translate_int_max), float(translate_frac_std)
        self.scale_std, self.aniso_std = float(scale_std), float(aniso_std)
        self.rotate_frac_max, self.aniso_rotate_prob = float(rotate_frac_max), float(aniso_rotate_prob)

    @property
    def enabled(self) -> tuple[str, ...]:
        """The transforms with a multiplier > 0, in label order."""
        return tuple(t for t in TRANSFORMS if self.multipliers[t] > 0)

    @property
    def label_dim(self) -> int:
        """Number of augment labels per sample: the network's ``augment_dim`` must equal it."""
        return sum(LABEL_SIZES[t] for t in self.enabled)

    def __repr__(self) -> str:
        enabled = ", ".join(f"{t}={self.multipliers[t]:g}" for t in self.enabled)
        return f"AugmentPipe(p={self.p:g}, {enabled}; label_dim={self.label_dim})"

    def __call__(self, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch.

        Args:
            images: ``[N, C, H, W]`` float, model space (any range: the transforms only move pixels).
            generator: random source on ``images.device``; torch's global one when None.
        Returns:
            ``(images [N, C, H, W] in images' dtype, augment_labels [N, label_dim] float32)``.
        """
        if images.ndim != 4:
            raise ValueError(f"AugmentPipe needs images [N, C, H, W]; got shape {tuple(images.shape)} "
                             "(augment applies to image data only: set augment=null)")
        N, C, H, W = images.shape
        if self.multipliers["rotate_int"] > 0 and H != W:
            raise ValueError(f"augment.rotate_int={self.multipliers['rotate_int']} needs square images; got {H}x{W}")
        draws = _Draws(N, generator, images.device)
        labels = [torch.zeros(N, 0, device=images.device)]
        with torch.autocast(images.device.type, enabled=False):  # augmentation runs in the data's precision
            images = self._blit(images, draws, labels)
            first = len(labels)
            inverse = self._inverse_affine(H, W, draws, labels)
            if inverse is not None:
                # Resample only the samples the affine labels say were moved, so that the others stay
                # bit-exact (EDM resamples the whole batch: the identity up to float rounding).
                moved = torch.stack([label.ne(0) for label in labels[first:]]).any(dim=0)
                if moved.any():
                    images = images.clone()
                    images[moved] = affine_warp(images[moved], inverse[moved]).to(images.dtype)
        return images, torch.cat([x.float().reshape(N, -1) for x in labels], dim=1)

    def _probability(self, name: str) -> float:
        return self.p * self.multipliers[name]

    def _blit(self, images: torch.Tensor, draws: _Draws, labels: list) -> torch.Tensor:
        """Flips, quarter turns and integer translations (exact pixel moves); appends their labels."""
        N, C, H, W = images.shape
        for name, dim in (("xflip", 3), ("yflip", 2)):
            if self.multipliers[name] > 0:
                flip = draws.gate(draws.integers(2), self._probability(name))
                images = torch.where((flip == 1)[:, None, None, None], images.flip(dim), images)
                labels.append(flip)
        if self.multipliers["rotate_int"] > 0:
            k = draws.gate(draws.integers(4), self._probability("rotate_int"))
            images = _rot90(images, k)
            labels += [(k == 1) | (k == 2), (k == 2) | (k == 3)]
        if self.multipliers["translate_int"] > 0:
            w = draws.gate(draws.uniform(2, low=-1.0, high=1.0), self._probability("translate_int"))
            tx = (w[0] * (W * self.translate_int_max)).round().long()
            ty = (w[1] * (H * self.translate_int_max)).round().long()
            images = _shift(images, tx, ty)
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]
        return images

    def _inverse_affine(self, H: int, W: int, draws: _Draws, labels: list) -> torch.Tensor | None:
        """Draw the affine map (scale, rotation, stretch, shift); returns its inverse ``[N, 3, 3]`` (output
        -> input pixel positions, centred) or None when none of them is enabled; appends their labels."""
        if not any(self.multipliers[t] > 0 for t in ("scale", "rotate_frac", "aniso", "translate_frac")):
            return None
        n = draws.n
        inverse = torch.eye(3, device=draws.device).expand(n, 3, 3)
        if self.multipliers["scale"] > 0:
            w = draws.gate(draws.normal(), self._probability("scale"))
            s = torch.exp2(w * self.scale_std)
            inverse = inverse @ scaling(1 / s, 1 / s)
            labels.append(w)
        if self.multipliers["rotate_frac"] > 0:
            a = draws.gate(draws.uniform(low=-math.pi * self.rotate_frac_max, high=math.pi * self.rotate_frac_max),
                           self._probability("rotate_frac"))
            inverse = inverse @ rotation(a)  # the content turns by -a
            labels += [a.cos() - 1, a.sin()]
        if self.multipliers["aniso"] > 0:
            w, r = draws.normal(), draws.uniform(low=-math.pi, high=math.pi)
            w = draws.gate(w, self._probability("aniso"))
            r = draws.gate(r, self.aniso_rotate_prob)
            s = torch.exp2(w * self.aniso_std)
            inverse = inverse @ rotation(-r) @ scaling(1 / s, s) @ rotation(r)  # stretch s along angle -r
            labels += [w * r.cos(), w * r.sin()]
        if self.multipliers["translate_frac"] > 0:
            w = draws.gate(draws.normal(2), self._probability("translate_frac"))
            tx, ty = w[0] * (W * self.translate_frac_std), w[1] * (H * self.translate_frac_std)
            inverse = inverse @ translation(-tx, -ty)
            labels += [w[0], w[1]]
        return inverse


def check_augment_dim(augment_dim: int, pipe: AugmentPipe | None) -> None:
    """Raise ``ValueError`` unless a network's ``augment_dim`` equals the number of labels ``pipe`` gives
    (0 without a pipe): a network with an augment-label input that gets no labels trains an embedding that
    never sees data (DDP then stops on unused parameters), and labels of another size cannot be read."""
    labels = 0 if pipe is None else pipe.label_dim
    if augment_dim == labels:
        return
    if pipe is None:
        raise ValueError(f"network.augment_dim={augment_dim} needs an augmentation pipe giving {augment_dim} labels, "
                         f"but augment=null; allowed: augment=edm (EDM's non-leaky pipe, 9 labels) with "
                         f"network.augment_dim=9, or network.augment_dim=0")
    raise ValueError(f"network.augment_dim={augment_dim} does not match augment={pipe!r}, which gives {labels} "
                     f"labels per image; allowed: network.augment_dim={labels}, or an augment config with "
                     f"{augment_dim} labels, or augment=null with network.augment_dim=0")
