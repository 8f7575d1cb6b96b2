"""Throughput of our FID path against torch-fidelity's ``calculate_metrics`` on the same images and
weights (same network; ours runs it in channels_last, oneDNN's fast layout, and sums moments in float64),
and the cost of ODE bits/dim in denoiser evaluations per image on a Gaussian toy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metrics.py [--images 64] [--repeats 3] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import clock
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from lightning_diff.analytic import GaussianMixture
from lightning_diff.evaluation.likelihood import ode_bits_per_dim
from lightning_diff.evaluation.metrics import (
    Extractors,
    compute_metrics,
    fid_helper_weights_path,
    resolve_inception_weights,
)
from lightning_diff.evaluation.metrics.extractor import POOL3_EXTRACTOR, build_extractor


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def fid_throughput(n: int, device: str, cache: str, repeats: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    gen = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    ref = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    weights = str(fid_helper_weights_path())
    _, converted = resolve_inception_weights(weights, cache)
    extractors = Extractors.build(
        ("fid",), weights, device=device, cache_dir=cache
    )  # built once, as a callback would
    def ours_fid() -> float:
        return compute_metrics(gen, ref, extractors=extractors, device=device, fid_method="eigvals")["fid"]

    def theirs_fid() -> float:
        return torch_fidelity.calculate_metrics(
            input1=_Images(gen), input2=_Images(ref), fid=True, feature_extractor=POOL3_EXTRACTOR,
            feature_extractor_weights_path=converted, cuda=device == "cuda", cache=False, save_cpu_ram=True,
            verbose=False,
        )["frechet_inception_distance"]

    compute_metrics(gen[:4], ref[:4], extractors=extractors, device=device, fid_method="eigvals")  # warm-up
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(repeats):  # interleaved, median: both paths see the same machine state
        for name, fn in (("ours", ours_fid), ("theirs", theirs_fid)):
            t0 = clock.now()
            value = fn()
            times[name].append(clock.now() - t0)
            if name == "ours":
                ours = value
            else:
                theirs = value
    t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    print(
        f"FID on {n}+{n} images ({device}): ours {2 * n / t_ours:.2f} img/s (fid {ours:.4f}), torch-fidelity "
        f"{2 * n / t_theirs:.2f} img/s (fid {theirs:.4f}); ratio {t_theirs / t_ours:.2f}x; "
        f"rel diff {abs(ours - theirs) / theirs:.1e}"
    )


def feature_throughput(n: int, device: str, cache: str, repeats: int = 3) -> None:
    """The Inception forward alone (what the FID path costs per image at 50k images, where the Fréchet step is
    negligible): our extractor (``build_extractor``: channels_last, the separable resize) against torch-fidelity's
    registered class in its own layout, same weights, on 32x32 RGB and 8x8 grey (digits) uint8 batches; the
    features must agree to float32 summation-order error."""
    weights = str(fid_helper_weights_path())
    name, converted = resolve_inception_weights(weights, cache)
    ours = build_extractor(name, ["2048"], converted, device)
    theirs = FEATURE_EXTRACTORS_REGISTRY[name](name, ["2048"], feature_extractor_weights_path=converted)
    theirs = theirs.to(device).eval()
    g = torch.Generator().manual_seed(3)
    batches = {"32x32 RGB": (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8),
               "8x8 grey": (torch.rand(n, 1, 8, 8, generator=g) * 255).to(torch.uint8).expand(-1, 3, -1, -1)}
    for label, images in batches.items():
        images = images.to(device)
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        with torch.no_grad():
            for _ in range(repeats):
                for who, net in (("ours", ours), ("theirs", theirs)):
                    t0 = clock.now()
                    out = net(images)[0]
                    times[who].append(clock.now() - t0)
                    if who == "ours":
                        a = out
                    else:
                        b = out
        ratio = statistics.median(times["theirs"]) / statistics.median(times["ours"])
        print(f"Inception features, {n} {label} images ({device}): ours {n / statistics.median(times['ours']):.2f} "
              f"img/s, torch-fidelity {n / statistics.median(times['theirs']):.2f} img/s; ratio {ratio:.2f}x; "
              f"max feature difference {((a - b).abs().max() / b.abs().max()).item():.1e} of the largest")


def bpd_cost(device: str) -> None:
    d, n = 64, 8
    gm = GaussianMixture(torch.zeros(d), 0.5, shape=(1, 8, 8))
    x_int = ((gm.sample(n, torch.Generator().manual_seed(1)) + 1) * 127.5).round().clamp(0, 255).to(device)
    for divergence in ("hutchinson", "exact"):
        t0 = clock.now()
        bpd, info = ode_bits_per_dim(
            gm,
            x_int,
            scale=1 / 127.5,
            offset=-1.0,
            sigma_min=0.002,
            sigma_max=80.0,
            divergence=divergence,
            generator=torch.Generator().manual_seed(2),
        )
        print(
            f"ODE bits/dim ({divergence}, d={d}, rtol=atol=1e-5): {bpd.mean():.4f} bpd, "
            f"{info['nfe_per_image']} NFE per image, {clock.now() - t0:.2f} s for {n} images"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4+4 images, one repeat")
    clock.add_argument(parser)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()} clock={clock.use(args.clock, args.device)}")
    if args.quick:
        args.images, args.repeats = 4, 1
    with tempfile.TemporaryDirectory() as cache:
        fid_throughput(args.images, args.device, cache, args.repeats)
        feature_throughput(args.images, args.device, cache, args.repeats)
    bpd_cost(args.device)
