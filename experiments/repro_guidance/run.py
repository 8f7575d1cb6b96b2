"""Classifier-free guidance on 8x8 digits (Ho & Salimans 2022, the FID-IS trade-off of Table 1) at toy scale.

One class-conditional model of edm_digits' recipe (configs/experiment/edm_digits.yaml with ``module.conditional=true``)
trained with label dropout (the null label replaces the class with probability ``network.label_dropout``, their
p_uncond), sampled with the guided denoiser ``D_gamma = D(x) + gamma (D(x, c) - D(x))`` (``sampling.CFGDenoiser``;
gamma = 1 + w in the paper's ``(1 + w) eps(x, c) - w eps(x)``: gamma = 1 is the conditional model, 0 the
unconditional one) at several gamma. Per gamma, on the same seeds (asked class ``seed % 10``):

- fidelity: the share of samples the small digits classifier (``metrics/small_classifier.py``, trained on real
  digits; its held-out accuracy is printed with the table) reads as the asked class;
- diversity and quality: Fréchet distance (FD) and KID to the training digits in that classifier's features
  (``lightning_diff.cli.reproduction.quality``, which also writes each gamma's leaderboard record), lower is better;
  Inception FID on the gamma = 1 row.

Usage: ``python experiments/repro_guidance/run.py [--out DIR] [--quick]``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lightning_diff.cli.reproduction import (  # noqa: E402
    QUICK_TRAINING,
    argument_parser,
    markdown_table,
    quality,
    trained,
    write_results,
)
from lightning_diff.data.transforms import to_uint8  # noqa: E402
from lightning_diff.evaluation import generate  # noqa: E402
from lightning_diff.evaluation.metrics.small_classifier import SmallClassifier, load_or_train  # noqa: E402

HERE = Path(__file__).resolve().parent
LABEL_DROPOUT = 0.1  # p_uncond; Ho & Salimans 2022 Sec. 4 find 0.1 and 0.2 best on ImageNet 64x64
MODEL = ["experiment=edm_digits", "module.conditional=true", f"network.label_dropout={LABEL_DROPOUT}"]
GAMMAS = [0.0, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0]  # 0: unconditional, 1: conditional (w = 0), w = gamma - 1
SAMPLER = {"name": "heun", "steps": 10}  # EDM's deterministic Heun: 19 evaluations, each 2 passes when guided
INCEPTION_GAMMA = 1.0  # the row that also reports Inception FID


def load_small_classifier(dataset: str = "digits") -> tuple[SmallClassifier, float]:
    """The cached small classifier of ``dataset`` (the FD/KID feature extractor) and its held-out accuracy."""
    state = torch.load(load_or_train(dataset), map_location="cpu", weights_only=True)
    model = SmallClassifier(state["num_classes"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), float(state["held_out_accuracy"])


@torch.no_grad()
def class_accuracy(classifier: SmallClassifier, images: torch.Tensor, asked: torch.Tensor) -> float:
    """Share of uint8 images ``[N, 1, R, R]`` that ``classifier`` reads as their asked class ``asked [N]``
    (the images scaled to [-1, 1] as the classifier was trained)."""
    if images.dtype != torch.uint8 or images.shape[0] != asked.shape[0]:
        raise ValueError(f"class_accuracy: images {images.dtype} {tuple(images.shape)} and labels "
                         f"{tuple(asked.shape)}; allowed: uint8 [N, 1, R, R] and N labels")
    logits = classifier(images.float() / 127.5 - 1)[1]
    return float((logits.argmax(dim=1) == asked).float().mean())


def sweep(module, data, classifier: SmallClassifier, num_images: int) -> list[dict]:
    """``[{"gamma", "w", "accuracy", "fd", "kid", "kid_std"[, "fid"]}]`` for each gamma of ``GAMMAS`` on seeds
    ``0 .. num_images - 1``: FD and KID by ``reproduction.quality`` (one leaderboard record per gamma; Inception FID
    too on the ``INCEPTION_GAMMA`` row) and the class accuracy of the same seeds' samples, generated again here
    (sample i depends on seed i only: they are the images ``quality`` scored)."""
    rows = []
    for gamma in GAMMAS:
        scores = quality(module, data, SAMPLER, num_samples=num_images, guidance=gamma,
                         inception=gamma == INCEPTION_GAMMA)
        samples, asked, _ = generate(module, range(num_images), sampler=SAMPLER, guidance=gamma, progress=False)
        accuracy = class_accuracy(classifier, to_uint8(samples, data.transform), asked)
        rows.append({"gamma": gamma, "w": gamma - 1, "accuracy": accuracy,
                     **{k: scores[k] for k in ("fd", "kid", "kid_std", "fid") if k in scores}})
        print(f"gamma={gamma:5g} accuracy={accuracy:.3f} FD={scores['fd']:.4g} KID={scores['kid']:.4g}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One row per gamma; Inception FID where measured."""
    return markdown_table(["gamma", "w = gamma - 1", "class accuracy", "FD", "KID", "Inception FID"],
                          [[r["gamma"], r["w"], r["accuracy"], r["fd"], r["kid"], r.get("fid", "")] for r in rows])


def figure(rows: list[dict]):
    """Left: FD against the class error 1 - accuracy (symlog), one point per gamma (Ho & Salimans' FID-vs-IS
    trade-off curve; fidelity grows to the left). Right: accuracy and FD against gamma."""
    fig, (ax, right) = plt.subplots(1, 2, figsize=(10, 4))
    errors, fds = [1 - r["accuracy"] for r in rows], [r["fd"] for r in rows]
    ax.plot(errors, fds, marker="o")
    for r, error in zip(rows, errors, strict=True):
        ax.annotate(f"γ={r['gamma']:g}", (error, r["fd"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set(xlabel="class error of the small classifier, 1 - accuracy", ylabel="FD, small classifier (lower better)",
           title="FD vs fidelity, one point per guidance scale")
    gammas = [r["gamma"] for r in rows]
    right.plot(gammas, fds, marker="o", color="C0", label="FD")
    right.set(xlabel="guidance scale γ = 1 + w (1: conditional, 0: unconditional)", ylabel="FD (lower better)")
    twin = right.twinx()
    twin.plot(gammas, [r["accuracy"] for r in rows], marker="s", color="C1", label="class accuracy")
    twin.set(ylabel="class accuracy")
    right.legend(handles=[*right.get_lines(), *twin.get_lines()], loc="center right", fontsize=8)
    fig.suptitle("Classifier-free guidance on digits (the shape of Ho & Salimans 2022's FID-IS trade-off)")
    return fig


def main() -> None:
    args = argument_parser(__doc__, "repro_guidance").parse_args()
    out = Path(args.out)
    quick = list(QUICK_TRAINING) if args.quick else []
    num_images = 16 if args.quick else 500
    module, data = trained("cond_digits", [*MODEL, *quick], out / "runs")
    classifier, held_out = load_small_classifier()
    rows = sweep(module, data, classifier, num_images)
    text = (f"Class-conditional EDM model of the digits (label dropout {LABEL_DROPOUT}), deterministic Heun "
            f"{SAMPLER['steps']} steps, {num_images} samples (seeds 0..{num_images - 1}, asked class seed % 10). "
            f"Class accuracy: the small digits classifier ({held_out:.1%} on its held-out real digits); FD/KID in "
            f"its features against the training digits, lower is better; Inception FID on one row (not comparable "
            f"to published FIDs).\n\n"
            f"{table(rows)}")
    write_results(out, text, {"rows": rows, "num_images": num_images, "sampler": SAMPLER, "model": MODEL,
                              "small_classifier_held_out_accuracy": held_out},
                  {"guidance.png": figure(rows)}, publish_to=None if args.quick else HERE)


if __name__ == "__main__":
    main()
