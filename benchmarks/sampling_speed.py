"""Sampling throughput (images/s) against the reference tools on the same network, grid and batch.

1. EDM Heun (18 steps, 35 NFE, Karras grid): ``sampling.sample("heun")`` with the solver state in float64
   (the default, as NVlabs/edm) and in float32, and ``DiffusionModule.sample`` (what ``lightning-diff sample``
   runs: per-seed noise, the module's sampler settings), against k-diffusion's ``sample_heun`` loop (copied
   below, k-diffusion is not a dependency: its ``__init__`` imports clean-fid, CLIP, wandb, ...).
2. DDIM (eta = 0, 50 steps) on a diffusers ``UNet2DModel``: our ``ddim`` through ``pretrained.diffusers_folder``
   against diffusers' ``DDIMPipeline``.
3. Classifier-free guidance: one guided Heun run (``CFGDenoiser``: one concatenated ``[x; x]`` batch per call)
   against two unguided runs of the same batch; target <= 1.05x.

Each variant runs ``--repeats`` times interleaved (A B C A B C ...) in one process; medians are reported.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_speed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import clock
import torch

from lightning_diff import formulations, sampling
from lightning_diff.denoiser import Denoiser
from lightning_diff.formulations import schedules
from lightning_diff.networks import TinyUNet
from lightning_diff.sampling import CFGDenoiser
from lightning_diff.training.module import DiffusionModule

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's sampling grid


@torch.no_grad()
def k_diffusion_sample_heun(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """crowsonkb/k-diffusion ``k_diffusion/sampling.py::sample_heun`` (v0.1.1), verbatim but for the callback
    and progress bar: float32 state, grid as a tensor (its comparisons read the device each step)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = (x - denoised) / sigma_hat  # to_d
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler method
        else:
            x_2 = x + d * dt  # Heun's method
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, run A B C A B C ... (the machine's load hits all alike)."""
    for run in variants.values():  # warm-up: first-call allocations and lazy imports are not timed
        run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = clock.now()
            run()
            times[name].append(clock.now() - start)
    spread = {name: (max(t) - min(t)) / statistics.median(t) for name, t in times.items()}
    print(f"  (spread max-min over median: {', '.join(f'{k} {v:.0%}' for k, v in spread.items())})")
    return {name: statistics.median(t) for name, t in times.items()}


def table(title: str, batch: int, seconds: dict[str, float], baseline: str) -> list[tuple[str, float, float]]:
    print(title)
    rows = []
    for name, t in seconds.items():
        rows.append((name, batch / t, seconds[baseline] / t))
        print(f"  {name:<44} {batch / t:8.1f} img/s  {seconds[baseline] / t:5.2f}x vs {baseline}")
    return rows


def heun_case(batch: int, steps: int, repeats: int, channels: int, side: int):
    torch.manual_seed(0)
    net = TinyUNet(in_channels=channels, model_channels=32, channel_mult=(1, 2), num_blocks=1, resolution=side,
                   num_classes=10, label_dropout=0.1).eval()
    denoiser = Denoiser(net, formulations.get("edm")).eval()
    module = DiffusionModule(net, formulations.get("edm"), data_shape=(channels, side, side),
                             sampler={"name": "heun", "steps": steps}).eval()
    sigmas = schedules.karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX, RHO)
    x = SIGMA_MAX * torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(1))
    x32, sigmas32 = x.float(), sigmas.float()
    labels = torch.arange(batch) % 10
    seeds = list(range(batch))

    def uncond(x_, s):
        return denoiser(x_, s)

    with torch.no_grad():
        ours64 = sampling.sample("heun", uncond, x, sigmas)
        ours32 = sampling.sample("heun", uncond, x, sigmas, dtype=torch.float32)
        theirs = k_diffusion_sample_heun(uncond, x32, sigmas32)
    print(f"heun: max |ours float64 - k-diffusion float32| = {(ours64 - theirs).abs().max():.2e}, "
          f"|ours float32 - k-diffusion| = {(ours32 - theirs).abs().max():.2e}")
    cfg = CFGDenoiser(denoiser, 2.0)
    with torch.no_grad():
        seconds = interleaved({
            "k-diffusion sample_heun (float32 state)": lambda: k_diffusion_sample_heun(uncond, x32, sigmas32),
            "ours heun, float64 state (default)": lambda: sampling.sample("heun", uncond, x, sigmas),
            "ours heun, float32 state": lambda: sampling.sample("heun", uncond, x, sigmas, dtype=torch.float32),
            "ours DiffusionModule.sample (lightning-diff sample)": lambda: module.sample(seeds),
            "2 unguided heun runs": lambda: [sampling.sample("heun", denoiser, x, sigmas, cond={"labels": labels}),
                                             sampling.sample("heun", denoiser, x, sigmas)],
            "CFG heun, one [x; x] batch": lambda: sampling.sample("heun", cfg, x, sigmas, cond={"labels": labels}),
        }, repeats)
    rows = table(f"EDM Heun, {steps} steps ({2 * steps - 1} NFE), batch {batch}, {channels}x{side}x{side}, "
                 f"TinyUNet {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M", batch, seconds,
                 "k-diffusion sample_heun (float32 state)")
    cfg_ratio = seconds["CFG heun, one [x; x] batch"] / seconds["2 unguided heun runs"]
    print(f"  CFG cost: {cfg_ratio:.3f}x two unguided runs (target <= 1.05)")
    return rows, cfg_ratio


def ddim_case(batch: int, steps: int, repeats: int):
    import diffusers

    from lightning_diff.pretrained import diffusers_folder

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as root:
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False)).save_pretrained(root)
        denoiser = diffusers_folder.load(root).denoiser.eval()
    sigmas = denoiser.formulation.sampling_sigmas(steps)
    noise = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = noise * (1 + sigmas[0] ** 2).sqrt()

    def theirs():
        return pipeline(batch_size=batch, num_inference_steps=steps, eta=0.0, output_type="np",
                        generator=torch.Generator().manual_seed(3)).images

    with torch.no_grad():
        seconds = interleaved({
            "diffusers DDIMPipeline": theirs,
            "ours ddim, float64 state (default)": lambda: sampling.sample("ddim", denoiser, x, sigmas, eta=0.0),
            "ours ddim, float32 state": lambda: sampling.sample("ddim", denoiser, x.float(), sigmas, eta=0.0,
                                                                dtype=torch.float32),
        }, repeats)
    return table(f"DDIM eta=0, {steps} steps, batch {batch}, 3x16x16 diffusers UNet2DModel "
                 f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M", batch, seconds, "diffusers DDIMPipeline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny batch, few steps, one repeat")
    clock.add_argument(parser)
    args = parser.parse_args()
    batch, heun_steps, ddim_steps, repeats = (4, 3, 3, 1) if args.quick else (args.batch, 18, 50, args.repeats)
    print(f"threads={torch.get_num_threads()} repeats={repeats} clock={clock.use(args.clock)}")
    heun_case(batch, heun_steps, repeats, channels=3, side=16)
    ddim_case(batch, ddim_steps, repeats)


if __name__ == "__main__":
    main()
