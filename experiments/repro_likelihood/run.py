"""Bits/dim of one DDPM by the variational bound with four reverse variances, and by the probability-flow ODE
(Nichol & Dhariwal 2021, Table 1 and Sec. 4; Bao et al. 2022, Table 2), at toy scale on 8x8 digits.

The DDPM of experiments/repro_ddim_table1 (linear betas, T = 1000, edm_digits' tiny U-Net at half width with
2 output channels, ``objective=hybrid``: L_simple trains the mean, lambda L_vlb the variance head; the same
overrides, so ``trained`` trains it once for both) is scored on the 180 held-out digits (the data module has no
test split; ``split="test"`` takes the held-out one and the protocol names it):

- the discrete VLB (Ho et al. 2020 eq. 5, ``likelihood.vlb_bits_per_dim``: no dequantization, no offset) of the
  strided chains of K in {10, 25, 100, 1000} steps (``linspace`` spacing, round(linspace(0, T - 1, K)): Bao et al.
  2022's even trajectory, from timestep 0 to T - 1; betas re-derived as iDDPM's respacing does) with the reverse
  variance ``fixed_small`` (beta-tilde), ``fixed_large`` (beta),
  ``learned`` (iDDPM eq. 15 from the hybrid-trained head) and ``analytic`` (Analytic-DPM Thm 1, clipped to Thm 2,
  from the model's score moments on ``ANALYTIC_SAMPLES`` training digits per level); the same mean for all, the
  same x_t draws for all (seed 0), so the columns differ by the variance only;
- the PF-ODE bits/dim (``likelihood.ode_bits_per_dim``: uniform dequantization, RK45 at rtol = atol = 1e-5,
  Hutchinson trace): a different model and bound, never to be compared with the VLB (docs/likelihood.md).

Usage: ``python experiments/repro_likelihood/run.py [--out DIR] [--models DIR] [--quick]``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lightning_diff.cli.reproduction import DIGITS_DDPM, argument_parser, digits_ddpm, markdown_table, write_results  # noqa: E402
from lightning_diff.evaluation.split_likelihood import split_bits_per_dim, split_vlb  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANCES = ("fixed_small", "fixed_large", "learned", "analytic")  # iDDPM Table 1 / Analytic-DPM Table 2 rows
STEPS = (10, 25, 100, 1000)  # K: the strided chain's length (Analytic-DPM Table 2's columns)
SPACING = "linspace"  # the chain's timesteps: Bao et al. 2022's even trajectory, holding timestep 0
ANALYTIC_SAMPLES = 1000  # training digits per level, M of the Analytic-DPM moments (configs/metrics/vlb.yaml default)
SPLIT = "test"  # digits: the held-out split (the protocol names the split used)


def vlb_table(vlb: dict[str, dict[int, float]]) -> str:
    """Rows: the variances of ``vlb`` in order; columns: K. ``vlb``: variance -> K -> bits/dim."""
    steps = sorted({k for by_steps in vlb.values() for k in by_steps})
    return markdown_table(["variance", *(f"K={k}" for k in steps)],
                          [[variance, *(by_steps[k] for k in steps)] for variance, by_steps in vlb.items()])


def figure(vlb: dict[str, dict[int, float]]):
    """VLB bits/dim against K (log-log: fixed_small spans 4 to 200), one line per variance."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for variance, by_steps in vlb.items():
        steps = sorted(by_steps)
        ax.plot(steps, [by_steps[k] for k in steps], marker="o", label=variance)
    ax.set(xscale="log", yscale="log", xlabel="K (steps of the strided chain)",
           ylabel="VLB (bits/dim, held-out digits)", title="Reverse variance and the VLB: DDPM on 8x8 digits")
    ax.legend()
    return fig


def main() -> None:
    args = argument_parser(__doc__, "repro_likelihood", models=True).parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    if args.quick:
        steps, num_images, samples, tolerance = (2, 3), 8, 8, 1e-2
    else:
        steps, num_images, samples, tolerance = STEPS, None, ANALYTIC_SAMPLES, 1e-5
    module, data = digits_ddpm(args.models, quick=args.quick)
    vlb, protocols = {v: {} for v in VARIANCES}, {v: {} for v in VARIANCES}
    for k in steps:
        for variance in VARIANCES:
            result, protocol = split_vlb(module, data, split=SPLIT, num_images=num_images, batch_size=256,
                                         variance=variance, steps=k, spacing=SPACING, analytic_samples=samples,
                                         analytic_cache_dir=str(out / "analytic_moments"))
            vlb[variance][k], protocols[variance][str(k)] = result["vlb_bpd"], protocol
            print(f"K={k:4d} {variance:11s} VLB {result['vlb_bpd']:.4f} bits/dim", flush=True)
    ode, ode_protocol = split_bits_per_dim(module, data, split=SPLIT, num_images=num_images, batch_size=256,
                                           rtol=tolerance, atol=tolerance)
    print(f"PF-ODE {ode['bpd']:.4f} bits/dim", flush=True)
    held_out = ode_protocol["num_images"]
    ode_table = markdown_table(
        ["likelihood", "bits/dim", "sigma_min", "NFE per batch", "dequantization"],
        [["PF-ODE (RK45, Hutchinson)", ode["bpd"], ode_protocol["sigma_min"], round(ode_protocol["nfe"]),
          "uniform"]])
    table = (f"DDPM (linear betas, T=1000, hybrid loss) on 8x8 digits: bits/dim on {held_out} held-out digits "
             f"({ode_protocol['split']} split).\n\nDiscrete VLB of the K-step strided chain ({SPACING} timesteps, from "
             f"t = 0) by reverse variance "
             f"(lower is tighter; analytic: {samples} training digits per level):\n\n{vlb_table(vlb)}\n"
             f"Probability-flow ODE (a different model and bound: not comparable with the VLB):\n\n{ode_table}")
    record = {"model": list(DIGITS_DDPM),
              "vlb_bpd": {v: {str(k): b for k, b in by_steps.items()} for v, by_steps in vlb.items()},
              "vlb_protocols": protocols, "ode_bpd": ode["bpd"], "ode_protocol": ode_protocol}
    write_results(out, table, record, {"vlb_vs_steps.png": figure(vlb)}, publish_to=None if args.quick else HERE)


if __name__ == "__main__":
    main()
