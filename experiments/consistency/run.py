"""Consistency models on 8x8 digits (Song et al. 2023; Song & Dhariwal 2024; Geng et al. 2024): sample quality at 1, 2
and 4 network evaluations (NFE) of consistency distillation (CD) and consistency training (CT) against the teacher's
DDIM, Heun and DPM-Solver++(2M) and a progressive-distillation student (Salimans & Ho 2022) at the same NFE.

The teacher is the digits EDM model (configs/experiment/edm_digits.yaml; trained and cached by
``reproduction.trained`` unless ``--teacher CKPT`` is given). Both consistency models start from its network and are
trained by ``lightning-diff consistency`` (``lightning_diff.cli.consistency``): CD with its defaults (Heun teacher
steps on N = 18 levels, EMA target mu = 0.95, pseudo-Huber), CT with iCT's (curriculum N(k) from 10 to 1280 steps,
lognormal levels, 1 / (sigma_{n+1} - sigma_n) weights, pseudo-Huber, no EMA target): CT started from a diffusion
model is Geng et al.'s ECT. The progressive-distillation student halves a 16-step DDIM teacher four times
(``methods.distillation``); its 4-, 2- and 1-step students are measured at the end of their rounds.

Quality: Fréchet distance (FD) and KID in the small digits classifier's features on seeds 0..N-1
(``reproduction.quality``, which writes each result as a record beside the model's checkpoint; the students of
progressive distillation are scored on the same seeds by the same FD, without records).

Usage: ``python experiments/consistency/run.py [--teacher CKPT] [--cd-steps 300] [--ct-steps 300] [--out DIR]
[--quick]``
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_diff import formulations  # noqa: E402
from lightning_diff.cli.consistency import consistency  # noqa: E402
from lightning_diff.cli.reproduction import (  # noqa: E402
    QUICK_TRAINING,
    argument_parser,
    markdown_table,
    quality,
    trained,
    write_results,
)
from lightning_diff.config import compose  # noqa: E402
from lightning_diff.data.transforms import to_uint8  # noqa: E402
from lightning_diff.evaluation import split_batch, split_view  # noqa: E402
from lightning_diff.evaluation.metrics import compute_metrics  # noqa: E402
from lightning_diff.evaluation.metrics.small_classifier import extractor_name  # noqa: E402
from lightning_diff.methods.distillation import ProgressiveDistillation  # noqa: E402
from lightning_diff.training.builders import build_datamodule, load_module  # noqa: E402

HERE = Path(__file__).resolve().parent
TEACHER = ["experiment=edm_digits"]
NFES = (1, 2, 4)
PD_BASE = 16  # the progressive-distillation teacher's DDIM steps: 16 -> 8 -> 4 -> 2 -> 1
QUIET = ("logger=csv", "trainer=cpu", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false")
BASELINES = {"DDIM": "ddim", "Heun": "heun", "DPM-Solver++(2M)": "dpmpp_2m"}  # label -> sampler of the teacher


def without_sigma_min(sampler: dict) -> dict:
    """``sampler`` on the consistency sampler's levels: EDM's time steps with one level more, the last (sigma_min =
    0.002, where an ODE step barely moves) dropped (``formulations.Consistency.sampling_sigmas``). EDM's own N-step grid
    spends its last level on sigma_min; one step is ``[80, 0]`` either way."""
    steps = sampler["steps"]
    if steps == 1:
        return sampler
    level = float(formulations.get("consistency").sampling_sigmas(steps)[-2])
    return {**sampler, "time_steps": {"sigma_min": level}}


def heun_steps(nfe: int) -> int:
    """EDM's Heun takes 2N - 1 evaluations for N steps: the most steps within ``nfe`` (1 -> 1, 2 -> 1, 4 -> 2)."""
    return (nfe + 1) // 2


def consistency_model(mode: str, teacher: str, steps: int, lr: float, batch: int, root: Path):
    """``lightning-diff consistency mode=<mode> ckpt=<teacher>`` into ``<root>/<mode>``; the loaded model."""
    run = root / mode
    cfg = compose([f"mode={mode}", f"ckpt={teacher}", f"trainer.max_steps={steps}", f"optimizer.lr={lr}",
                   f"data.batch_size={batch}", f"paths.output_dir={run}", f"out={run}/checkpoints/last.ckpt",
                   *QUIET], "consistency")
    return load_module(consistency(cfg)["model"])


def small_classifier_fd(data):
    """``samples [N, *data_shape] in model space -> FD`` to ``data``'s training split in its small classifier's
    features (the measure of ``reproduction.quality``, for the progressive-distillation students)."""
    dataset, _, count = split_view(data, "train")
    reference = split_batch(dataset, data.transform, 0, count)[0]

    def fd(samples: torch.Tensor) -> dict:
        return {"fd": compute_metrics(to_uint8(samples, data.transform), reference, ["fid"],
                                      feature_extractor=extractor_name(data.name), device="cpu")["fid"]}

    return fd


def progressive_students(teacher, data, steps_per_round: int, lr: float, seeds: int) -> dict[int, float]:
    """``{student steps: FD}`` of progressive distillation from ``PD_BASE`` DDIM steps down to 1."""
    distiller = ProgressiveDistillation(
        teacher.denoiser, functools.partial(torch.optim.Adam, lr=lr), steps=PD_BASE, rounds=4,
        steps_per_round=steps_per_round, data_shape=teacher.data_shape, quality_samples=seeds,
        quality=small_classifier_fd(data))
    trainer = pl.Trainer(accelerator="cpu", max_steps=4 * steps_per_round, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(distiller, datamodule=data)
    return {r["steps"]: r["student_fd"] for r in distiller.history}


def results_table(rows: dict[str, dict[int, dict]]) -> str:
    """One row per method, FD at each NFE (a method's own NFE in brackets where it cannot take exactly that many)."""
    def cell(result: dict | None, nfe: int) -> str:
        if result is None:
            return "-"
        own = f" ({result['nfe']})" if result["nfe"] != nfe else ""
        return f"{result['fd']:.4g}{own}"

    header = ["method", *(f"FD at NFE {n}" for n in NFES)]
    return markdown_table(header, [[name, *(cell(by_nfe.get(n), n) for n in NFES)] for name, by_nfe in rows.items()])


def figure(rows: dict[str, dict[int, dict]], reference: dict):
    """FD against NFE for every method (one colour per method or teacher sampler; dotted: the teacher's sampler on the
    levels without sigma_min), with the teacher's 18-step Heun as the reference line."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {}
    for name, by_nfe in rows.items():
        points = sorted((r["nfe"], r["fd"]) for r in by_nfe.values())
        family = name.split(",")[0]
        colour = colours.setdefault(family, f"C{len(colours)}")
        style = "-o" if name.startswith(("CD", "CT")) else ":^" if "sigma_min" in name else "--s"
        ax.plot(*zip(*points, strict=True), style, color=colour, label=name)
    ax.axhline(reference["fd"], color="grey", linestyle=":", label=f"teacher Heun, {reference['nfe']} NFE")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample (NFE)", ylabel="FD, small classifier",
           xticks=list(NFES), xticklabels=[str(n) for n in NFES])
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Consistency models on digits: few-step quality (lower is better)")
    return fig


def main() -> None:
    parser = argument_parser(__doc__, "consistency")
    parser.add_argument("--teacher", default=None, help="checkpoint of lightning-diff train (default: train one)")
    parser.add_argument("--cd-steps", type=int, default=300)
    parser.add_argument("--ct-steps", type=int, default=300)
    parser.add_argument("--pd-steps-per-round", type=int, default=75)
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of CD and CT")
    parser.add_argument("--pd-lr", type=float, default=2e-4, help="Adam learning rate of progressive distillation")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=512)
    args = parser.parse_args()
    if args.quick:  # CT's curriculum needs at least its 8 stages
        args.cd_steps, args.ct_steps, args.pd_steps_per_round, args.seeds, args.batch_size = 2, 8, 1, 16, 16
    out, start = Path(args.out), time.time()
    quick = list(QUICK_TRAINING) if args.quick else []
    if args.teacher is None:
        teacher, data = trained("teacher", [*TEACHER, *quick], out / "runs")
        teacher_ckpt = str(Path(teacher.run_config["paths"]["output_dir"]) / "checkpoints" / "last.ckpt")
    else:
        teacher, teacher_ckpt = load_module(args.teacher), args.teacher
        data = build_datamodule(compose(["data=digits", f"data.batch_size={args.batch_size}"], "train"))
    print(f"teacher ready ({time.time() - start:.0f} s)", flush=True)
    score = functools.partial(quality, datamodule=data, num_samples=args.seeds)
    rows, seconds = {}, {}
    for label, mode, steps in (("CD", "cd", args.cd_steps), ("CT (from the teacher's weights: ECT)", "ct",
                                                               args.ct_steps)):
        pl.seed_everything(0)
        began = time.time()
        model = consistency_model(mode, teacher_ckpt, steps, args.lr, args.batch_size, out / "runs")
        seconds[mode] = time.time() - began
        rows[label] = {n: score(model, sampler={"name": "consistency", "steps": n}) for n in NFES}
        print(f"{label}: {steps} steps in {seconds[mode]:.0f} s", flush=True)
    for label, name in BASELINES.items():
        steps = heun_steps if name == "heun" else (lambda n: n)
        rows[f"teacher {label}"] = {n: score(teacher, sampler={"name": name, "steps": steps(n)}) for n in NFES}
        rows[f"teacher {label}, no sigma_min level"] = {
            n: score(teacher, sampler=without_sigma_min({"name": name, "steps": steps(n)})) for n in NFES}
    pl.seed_everything(0)
    began = time.time()
    students = progressive_students(teacher, data, args.pd_steps_per_round, args.pd_lr, args.seeds)
    seconds["pd"] = time.time() - began
    rows["progressive distillation"] = {n: {"fd": students[n], "nfe": n} for n in NFES}
    reference = score(teacher, sampler={"name": "heun", "steps": 18})
    text = (f"EDM teacher on digits ({args.teacher or TEACHER}). CD: {args.cd_steps} and CT: {args.ct_steps} Adam "
            f"steps (lr {args.lr}, batch {args.batch_size}) from the teacher's network; progressive distillation: 4 "
            f"rounds of {args.pd_steps_per_round} steps (lr {args.pd_lr}) from {PD_BASE} DDIM steps. FD in the small "
            f"digits classifier's features on {args.seeds} seeds (lower is better); a method's own NFE in brackets "
            f"where it differs; 'no sigma_min level': on the consistency sampler's levels (EDM's time steps with one "
            f"more level, the last, sigma_min, dropped) instead of EDM's own grid. Teacher, EDM's Heun at 18 steps "
            f"({reference['nfe']} NFE): FD {reference['fd']:.4g}.\n\n"
            f"{results_table(rows)}")
    write_results(out, text, {"rows": {k: {str(n): v for n, v in r.items()} for k, r in rows.items()},
                              "reference": reference, "train_seconds": seconds, "args": vars(args)},
                  {"fd_vs_nfe.png": figure(rows, reference)}, publish_to=None if args.quick else HERE)
    print(f"done in {time.time() - start:.0f} s wall")


if __name__ == "__main__":
    main()
