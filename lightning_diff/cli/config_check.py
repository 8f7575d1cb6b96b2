"""The check every entry point runs on the config Hydra composed, before any work (``check_command``).

- ``check_overrides``: a ``+key=value`` / ``++key=value`` override adds a key that Hydra does not check, so it must
  reach code that reads it: an argument of the object its node builds (``_target_``: the class's signature), a new
  callback (``+callbacks.<name>._target_=...``), or an open node whose consumer checks its keys itself
  (``OPEN_NODES``: released checkpoints' flags ``+pretrained.<flag>``, ``+classifier.<flag>``, ``sampler.options``,
  ``+smoke=cpu``). Anything else is refused with the key, a did-you-mean over the keys at its level and those keys;
  ``sample``, ``evaluate``, ``reflow`` and ``distill`` refuse ``MODEL_KEYS`` (``+formulation=...``, ``+network=...``):
  a loaded model's come from its checkpoint file, and the run would only record them.
- ``check_settings``: numeric and enum settings against ``RULES`` (the setting, its value and what is allowed), the
  sampler (``SamplerSettings``), and every ``_target_`` node's scalar values against the annotations of the
  arguments they are passed to (``trainer.max_steps=abc``: ``int``), so that no run ends in a traceback from inside
  torch or Lightning.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import pydoc
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..callbacks.posthoc_ema import SIGMA_REL_MAX
from ..config import CONFIG_DIR, world_size
from ..evaluation.likelihood import DIVERGENCES, PROBES, VARIANCES
from ..evaluation.metrics.stats import FRECHET_METHODS
from ..formulations.schedules import SPACINGS
from ..methods.consistency import CURRICULA, METRICS, MODES, SIGMA_SAMPLINGS, SOLVERS, WEIGHTINGS, stage_length
from ..pretrained import FORMATS
from ..sampling import SAMPLERS
from ..sampling.ancestral import DDPM_VARIANCES
from ..sampling.edm import ABLATION_SOLVERS
from ..sampling.grid_file import checked_sigmas, read_grid_file
from ..sampling.guidance import CLASSIFIER_FRAMES, GUIDANCE_KINDS, INTERVAL_ALLOWED, Guidance, checked_interval
from ..sampling.langevin import STEP_NORMS
from ..sampling.noise import SEED_PROTOCOLS
from ..sampling.sde import PREDICTORS
from ..sampling.settings import SamplerSettings
from .renamed import COMMANDS, rename_config

__all__ = ["Rule", "RULES", "OPEN_NODES", "MODEL_KEYS", "check_command", "check_overrides", "check_settings",
           "task_overrides"]

OPEN_NODES = {  # config name -> nodes whose new keys a consumer reads and checks itself
    "train": ("smoke", "sampler.options", "sampler.time_steps"),  # apply_smoke; SamplerSettings
    "sample": ("pretrained", "classifier", "sampler.options", "sampler.time_steps"),  # the released formats' flags
    "evaluate": ("pretrained", "sampler.options", "sampler.time_steps"),
    "reflow": ("sampler.options", "sampler.time_steps"),
    "distill": ("pretrained",),
    "consistency": ("pretrained", "sampler.options", "sampler.time_steps"),
    "tune-steps": ("pretrained", "sampler.options", "sampler.time_steps"),  # time_steps: _tuned_sampler refuses
}
COLLECTIONS = ("callbacks",)  # nodes whose every entry is built (build_callbacks): a new one needs a _target_
MODEL_KEYS = ("formulation", "network", "objective", "module", "augment", "data", "global_batch_size")
CHECKPOINT = {  # config name -> (the setting naming the model it loads, the top-level keys its checkpoint fixes)
    "sample": ("ckpt", MODEL_KEYS), "reflow": ("ckpt", MODEL_KEYS), "distill": ("ckpt", MODEL_KEYS),
    "evaluate": ("ckpt", tuple(k for k in MODEL_KEYS if k != "data")),  # data=<group>: the reference data
    "tune-steps": ("ckpt", MODEL_KEYS),
}
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")  # read by hydra.utils.instantiate
_ABSENT = object()  # a setting the composed config lacks
MAX_DEVICES = 1024  # processes per node (Lightning lists them: a huge count exhausts the memory)
MAX_TUNED_NFE = 100  # tune-steps' largest budget: the derivative-free search grows with the levels it tunes
GUIDANCE = ("guidance.kind", "guidance.scale", "guidance.interval", "guidance.ckpt")  # the guidance node


# ------------------------------------------------------------------------------------------------ rules

@dataclasses.dataclass(frozen=True)
class Rule:
    """What one setting allows: ``test(value) -> bool`` on the resolved value, ``allowed`` the words of the error."""

    test: Callable[[Any], bool]
    allowed: str


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int | None = None, *, null: bool = False, note: str = "") -> Rule:
    """An integer in ``[low, high]`` (``high`` None: no upper bound), or null when ``null``."""
    words = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(lambda v: (null and v is None) or (_is_int(v) and low <= v and (high is None or v <= high)),
                ("null or " if null else "") + words + note)


def number(low: float, high: float | None = None, *, above: bool = False, null: bool = False, note: str = "") -> Rule:
    """A finite number ``>= low`` (``> low`` when ``above``) and ``<= high``, or null when ``null``."""
    words = f"a finite number {'>' if above else '>='} {low}" + ("" if high is None else f" and <= {high}")
    return Rule(lambda v: (null and v is None) or (_is_number(v) and (v > low if above else v >= low)
                                                   and (high is None or v <= high)),
                ("null or " if null else "") + words + note)


def choice(*options, null: bool = False) -> Rule:
    """One of ``options`` (compared with their type: ``false`` is not ``0``), or null when ``null``."""
    words = ", ".join("true" if o is True else "false" if o is False else str(o) for o in options)
    return Rule(lambda v: (null and v is None) or any(type(v) is type(o) and v == o for o in options),
                ("null, " if null else "") + words)


def _accepted(check: Callable, value) -> bool:
    """Whether ``check(value)`` (a function that raises ValueError on a bad value) accepts ``value``."""
    try:
        check(value)
    except ValueError:
        return False
    return True


def either(*rules: Rule) -> Rule:
    """Any of ``rules``."""
    return Rule(lambda v: any(rule.test(v) for rule in rules), " or ".join(rule.allowed for rule in rules))


def _sigma_rels(value) -> bool:
    """A post-hoc EMA length in ``(0, SIGMA_REL_MAX)`` or a non-empty list of them (``callbacks.posthoc_ema``)."""
    values = value if isinstance(value, list) else [value]
    return values != [] and all(_is_number(v) and 0 < v < SIGMA_REL_MAX for v in values)


def _device_ids(value) -> bool:
    """A list of GPU indices or Lightning's ``"0,1"`` string."""
    if isinstance(value, str):
        return re.fullmatch(r"\d+(,\d+)*,?", value) is not None
    return isinstance(value, list) and value != [] and all(_is_int(i) and i >= 0 for i in value)


def _rules() -> dict[str, dict[str, Rule]]:
    """``RULES``: config name -> setting -> Rule (a setting the composed config lacks is not checked); the allowed
    choices are the constants of the modules that read the settings."""
    seed = integer(0, 2**32 - 1)  # Lightning's seed_everything range (numpy's)
    fraction, positive, boolean = number(0, 1), number(0, above=True), choice(True, False)
    text = Rule(lambda v: isinstance(v, str), "a string")
    common = {"seed": seed, "weights": choice("ema", "raw"), "seed_protocol": choice(*SEED_PROTOCOLS),
              "guidance.kind": choice(*GUIDANCE_KINDS),  # guidance=<number> (CFG's gamma): _guidance checks it
              "guidance.scale": number(0, null=True, note=" (gamma, 1 = none; null: the model's own)"),
              "guidance.interval": Rule(lambda v: _accepted(checked_interval, v), INTERVAL_ALLOWED),
              "guidance.ckpt": Rule(lambda v: v is None or isinstance(v, str), "null or a checkpoint path"),
              "device": Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                             "auto, cpu, cuda or cuda:<index>"),
              "pretrained.format": choice(*FORMATS, null=True),
              "pretrained.sha256": Rule(lambda v: v is None or (isinstance(v, str)
                                                                and re.fullmatch("[0-9a-fA-F]{64}", v) is not None),
                                        "null or 64 hexadecimal digits")}
    trainer = {"trainer.accumulate_grad_batches": integer(1),  # max_steps, max_epochs: check_run_length
               "trainer.check_val_every_n_epoch": integer(1, null=True),
               "trainer.log_every_n_steps": integer(0, null=True, note=" (0: no logging)"),
               "trainer.num_sanity_val_steps": integer(-1, note=" (-1: all)"),
               "trainer.num_nodes": integer(1),
               "trainer.devices": either(integer(1, MAX_DEVICES), choice(-1, "auto"),
                                         Rule(_device_ids, 'device ids ([0, 1] or "0,1")')),
               "trainer.gradient_clip_val": number(0, null=True),
               "trainer.gradient_clip_algorithm": choice("norm", "value"),
               "trainer.val_check_interval": either(integer(1, null=True), number(0, 1, above=True)),
               "trainer.fast_dev_run": either(boolean, integer(0)),
               **{f"trainer.limit_{split}_batches": either(integer(0, null=True), fraction)
                  for split in ("train", "val", "test")}}
    sampler = {f"sampler.options.{k}": rule for k, rule in {  # by option name, whatever the sampler (its signature)
        "S_churn": number(0), "S_tmin": number(0), "S_noise": number(0), "S_tmax": either(number(0), choice(math.inf)),
        "s_churn": number(0), "s_tmin": number(0), "s_noise": number(0), "s_tmax": either(number(0), choice(math.inf)),
        "eta": number(0, note=" (ddim: at most 1)"), "noise_scale": number(0, 1), "alpha": number(0, 1, above=True),
        "order": integer(1), "solver_type": choice("midpoint", "heun", "bh1", "bh2"), "lower_order_final": boolean,
        "r": number(0, 1, above=True),
        "variance": choice(*DDPM_VARIANCES, null=True), "clip_denoised": choice(True, False, null=True),
        "predictor": choice(*PREDICTORS), "corrector_steps": integer(0), "snr": positive,
        "step_norm": choice(*STEP_NORMS), "step_size": positive, "steps_per_level": integer(1),
        "denoise_final": boolean, "solver": choice(*ABLATION_SOLVERS), "rtol": positive, "atol": positive,
        "first_step": number(0, above=True, null=True), "safety": positive, "min_factor": positive,
        "max_factor": positive, "max_steps": integer(1)}.items()}
    sampler |= {"sampler.steps": integer(1, null=True, note=" (null: the model's own or the formulation's default)"),
                "sampler.batch_size": integer(1),
                "sampler.time_steps.sigmas": Rule(lambda v: _accepted(lambda g: checked_sigmas(g, "sigmas"), v),
                                                  "a list of at least 2 finite numbers, strictly decreasing, positive "
                                                  "but the last, which is 0"),
                "sampler.time_steps.file": Rule(lambda v: isinstance(v, str) and _accepted(read_grid_file, v),
                                                "a readable file written by lightning-diff tune-steps whose content "
                                                "matches its key (docs/tune_steps.md)")}
    pick = lambda *keys: {k: common[k] for k in keys}
    likelihood = {"split": choice("train", "val", "test"), "num_images": integer(1, null=True),
                  "batch_size": integer(1)}
    return {
        "train": {**pick("seed"), "global_batch_size": integer(1, null=True),
                  "max_batch_per_process": integer(1, null=True), **trainer, **sampler},
        "classifier": {**pick("seed"), "classifier.frame": choice(*CLASSIFIER_FRAMES),
                       "classifier.val_buckets": integer(1), **trainer,
                       "trainer.max_steps": integer(-1, note=" (-1: trainer.max_epochs)"),
                       "trainer.max_epochs": integer(-1, null=True)},
        "sample": {"num_samples": integer(1), **pick("seed", "weights", *GUIDANCE, "seed_protocol", "device",
                                                    "pretrained.format", "pretrained.sha256"),
                   "classifier.scale": number(0, note=" (0 = no guidance)"),
                   "class_label": integer(0, null=True, note=" (null: seed % num_classes)"),
                   "analytic_dpm.num_samples": integer(1), "analytic_dpm.batch_size": integer(1),
                   "analytic_dpm.seed": seed, **sampler},
        "evaluate": {**pick("seed", "weights", *GUIDANCE, "seed_protocol", "device", "pretrained.format",
                            "pretrained.sha256"),
                     "progress": boolean, "wandb": choice("auto", False),
                     "metrics.num_samples": integer(1), "metrics.seed_sets": integer(1),
                     "metrics.reference_num_images": integer(1, null=True), "metrics.batch_size": integer(1),
                     "metrics.fid.method": choice(*FRECHET_METHODS), "metrics.is.splits": integer(1),
                     "metrics.kid.subsets": integer(1), "metrics.kid.subset_size": integer(2),
                     "metrics.pr.neighborhood": integer(1),
                     **{f"metrics.bpd.{k}": rule for k, rule in likelihood.items()},
                     "metrics.bpd.passes": integer(1), "metrics.bpd.rtol": positive,
                     "metrics.bpd.atol": positive, "metrics.bpd.divergence": choice(*DIVERGENCES),
                     "metrics.bpd.probes": integer(1), "metrics.bpd.probe": choice(*PROBES),
                     "metrics.bpd.sigma_min": number(0, above=True, null=True),
                     "metrics.bpd.sigma_max": number(0, above=True, null=True),
                     **{f"metrics.vlb.{k}": rule for k, rule in likelihood.items()},
                     "metrics.vlb.variance": choice(*VARIANCES), "metrics.vlb.steps": integer(1, null=True),
                     "metrics.vlb.spacing": choice(*SPACINGS), "metrics.vlb.clip_denoised": boolean,
                     "metrics.vlb.analytic_samples": integer(1), **sampler},
        "reflow": {**pick("seed", "weights", "device"), "num_samples": integer(1),
                   "straightness.num_samples": integer(1), "straightness.steps": integer(1), **sampler},
        "distill": {**pick("weights", "pretrained.format", "pretrained.sha256"), "steps": integer(2),
                    "rounds": integer(1, 62, note=" (2^rounds must divide steps)"), "steps_per_round": integer(1),
                    "quality_samples": integer(0), **trainer,
                    "trainer.max_steps": integer(-1, note=" (-1: rounds * steps_per_round)")},
        "consistency": {**pick("seed", "weights", "pretrained.format", "pretrained.sha256"), "mode": choice(*MODES),
                        "init": choice("ckpt", "scratch", null=True), "num_scales": integer(2),
                        "curriculum": choice(*CURRICULA, null=True), "s0": integer(1), "s1": integer(1),
                        "solver": choice(*SOLVERS), "sigma_sampling": choice(*SIGMA_SAMPLINGS, null=True),
                        "target_decay": Rule(lambda v: v is None or (_is_number(v) and 0 <= v < 1),
                                             "null or a number in [0, 1) (the EMA target's mu)"),
                        "p_mean": number(-math.inf), "p_std": positive, "weighting": choice(*WEIGHTINGS, null=True),
                        "metric": choice(*METRICS), "huber_c": number(0, null=True), **trainer,
                        "trainer.max_steps": integer(1, note=" (K: the curriculum's optimizer steps)"), **sampler},
        "leaderboard": {"metric": text, "direction": choice("auto", "min", "max"), "figures": boolean,
                        "title": text, "wandb_table": Rule(lambda v: v is None or isinstance(v, str),
                                                           "null or a W&B project")},
        "posthoc-ema": {"ckpt_dir": text, "out": Rule(lambda v: v is None or isinstance(v, str), "null or a folder"),
                        "sigma_rel": Rule(_sigma_rels, f"a number in (0, {SIGMA_REL_MAX:.4f}) or a non-empty list of "
                                                       "them (a power-function EMA profile's relative std)")},
        "reference": {**pick("device"), "progress": boolean, "metrics.reference": text,
                      "metrics.reference_num_images": integer(1, null=True), "metrics.batch_size": integer(1)},
        "tune-steps": {**pick("seed", "weights", "device", "pretrained.format", "pretrained.sha256"), "out": text,
                       "nfe": integer(2, MAX_TUNED_NFE, note=" (network evaluations per sample)"),
                       "num_seeds": integer(1), "heldout_seeds": integer(0, note=" (0: none)"),
                       "reference_steps": integer(2), "rho": number(0, above=True), "max_evals": integer(1),
                       **sampler},
    }


RULES = _rules()


def _distill_grid(values: Mapping) -> None:
    """Each round halves the steps (distillation.round_grids' condition, checked before the teacher (ckpt=) is
    loaded)."""
    steps, rounds = values["steps"], values["rounds"]
    if steps % 2**rounds:
        raise ValueError(f"rounds={rounds} with steps={steps} is invalid; allowed: steps divisible by 2^rounds (each "
                         "round halves them: steps=64, rounds <= 6)")


def _cpu_devices(values: Mapping) -> None:
    """Lightning's CPU accelerator takes a process count, not GPU ids nor -1 (every GPU)."""
    trainer = values.get("trainer") or {}
    devices = trainer.get("devices", "auto")
    if trainer.get("accelerator") == "cpu" and not (devices == "auto" or (_is_int(devices) and devices >= 1)):
        raise ValueError(f"trainer.devices={devices!r} is invalid with trainer.accelerator=cpu; allowed: an integer "
                         f"in [1, {MAX_DEVICES}] (processes) or auto")


def _validation_interval(values: Mapping) -> None:
    """Lightning reads a fractional ``val_check_interval`` per epoch, so it needs ``check_val_every_n_epoch``."""
    trainer = values.get("trainer") or {}
    interval = trainer.get("val_check_interval")
    if isinstance(interval, float) and trainer.get("check_val_every_n_epoch", 1) is None:
        raise ValueError(f"trainer.val_check_interval={interval} (a fraction of an epoch) with "
                         "trainer.check_val_every_n_epoch=null is invalid; allowed: an integer number of steps, or "
                         "check_val_every_n_epoch an integer >= 1")


def check_run_length(trainer: DictConfig) -> None:
    """A run trains and ends: ``trainer.max_steps`` >= 1 optimizer steps, or -1 (no step limit) with
    ``trainer.max_epochs`` >= 1. ``max_steps=0`` would exit 0 having trained nothing, -1 with ``max_epochs`` -1 would
    never end and with ``max_epochs`` null would run Lightning's default of 1000 epochs; other values Lightning
    refuses only after the data and the network are built."""
    steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if (isinstance(steps, int) and steps >= 1) or (steps == -1 and isinstance(epochs, int) and epochs >= 1):
        return
    raise ValueError(f"trainer.max_steps={steps} (with trainer.max_epochs={epochs}) trains nothing or never ends; "
                     "allowed: an integer >= 1 (optimizer steps), or -1 with trainer.max_epochs >= 1 (whole epochs)")


def _run_length(values: Mapping) -> None:
    trainer = values.get("trainer") or {}
    if _is_int(trainer.get("max_steps")):  # another type: the Trainer argument's type rule names it
        check_run_length(trainer)


def _guidance(values: Mapping) -> None:
    """``guidance``: a number (CFG's gamma) or a consistent node (autoguidance names its weaker model, CFG none);
    ``sampling.Guidance`` says what is wrong."""
    Guidance.from_config(values.get("guidance"))


def _consistency(values: Mapping) -> None:
    """``mode=cd`` distils a teacher (``ckpt``), the model meets the boundary condition (``formulation=consistency``)
    and iCT's curriculum fits in the run (``methods.consistency.stage_length``), before any data or model is loaded."""
    if values["mode"] == "cd" and values.get("ckpt") is None:
        raise ValueError("mode=cd with ckpt=null: consistency distillation needs a teacher; allowed: ckpt=<checkpoint>"
                         " of lightning-diff train or a released one, or mode=ct")
    target = (values.get("formulation") or {}).get("_target_", "")
    if target != "lightning_diff.formulations.Consistency":
        raise ValueError(f"formulation={target} does not meet the boundary condition c_skip(sigma_min) = 1, "
                         "c_out(sigma_min) = 0; allowed: formulation=consistency")
    if values["curriculum"] == "ict" or (values["curriculum"] is None and values["mode"] == "ct"):
        try:
            stage_length(values["trainer"]["max_steps"], values["s0"], values["s1"])
        except ValueError as err:
            raise ValueError(f"trainer.max_steps={values['trainer']['max_steps']}, s0={values['s0']}, "
                             f"s1={values['s1']}: {err}") from None


def _tuned_sampler(values: Mapping) -> None:
    """tune-steps makes the grid: its step count comes from ``nfe`` and its levels from the tuning."""
    sampler = values.get("sampler") or {}
    for key in ("steps", "time_steps"):
        if sampler.get(key) is not None:
            raise ValueError(f"sampler.{key}={sampler[key]} is invalid for lightning-diff tune-steps, which makes the "
                             f"grid (its step count from nfe={values.get('nfe')}); allowed: sampler.{key}=null")


TRAINER_CHECKS = (_cpu_devices, _validation_interval)
CROSS_CHECKS = {  # config name -> checks of several settings, after the rules
    "train": (*TRAINER_CHECKS, _run_length), "classifier": (*TRAINER_CHECKS, _run_length),
    "distill": (_distill_grid, *TRAINER_CHECKS), "sample": (_guidance,),
    "consistency": (*TRAINER_CHECKS, _consistency),
    "evaluate": (_guidance,), "tune-steps": (_tuned_sampler,)}  # distill: max_steps -1 = rounds x steps_per_round


# ------------------------------------------------------------------------------------------------ entry point

def task_overrides() -> list[str]:
    """The overrides of the command line Hydra is running (``HydraConfig``'s ``overrides.task``); [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_command(cfg: DictConfig, config_name: str, overrides: Sequence[str] | None = None) -> None:
    """Run by every command's ``main`` right after Hydra composed ``cfg`` (``configs/<config_name>.yaml``): the
    renamed keys a config file still sets move to their new names (``renamed.rename_config``, in place), then
    ``check_overrides`` on ``overrides`` (None: the command line's) and ``check_settings``. ValueError naming the
    setting, its value and what is allowed."""
    rename_config(cfg, config_name)
    check_overrides(cfg, task_overrides() if overrides is None else overrides, config_name)
    check_settings(cfg, config_name)


# ------------------------------------------------------------------------------------------------ '+' overrides

def _added(overrides: Sequence[str]) -> list:
    """The ``+`` / ``++`` overrides of ``overrides`` (Hydra's parser), but those of Hydra's own node."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o for o in parsed if (o.is_add() or o.is_force_add()) and _key(o).split(".")[0] != "hydra"]


def _key(override) -> str:
    """The config path an override writes: its package (``+group@pkg=...``) or its key, groups' ``/`` as ``.``."""
    package = override.package
    return package if package and not package.startswith("_global_") else override.key_or_group.replace("/", ".")


def _base(config_name: str, overrides: Sequence[str], added: Sequence[str]) -> dict:
    """The config composed without the ``+``/``++`` overrides (nor those under the keys they add), unresolved:
    what existed before they added anything."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides))
            if not (o.is_add() or o.is_force_add() or _key(o).split(".")[0] == "hydra"
                    or any(_key(o) == k or _key(o).startswith(k + ".") for k in added))]
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main: its config folder
        cfg = compose(config_name, overrides=kept)
    else:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=kept)
    return OmegaConf.to_container(cfg, resolve=False)


def _lookup(tree, dotted: str, default=None):
    """``tree[a][b]...`` for ``"a.b..."`` in nested dicts (``""``: the tree itself), else ``default``."""
    for part in dotted.split(".") if dotted else ():
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _did_you_mean(name: str, candidates) -> str:
    """``"; did you mean <closest>? "`` (difflib) or ``"; "``: what goes between an error and its ``allowed:``."""
    match = difflib.get_close_matches(name, [str(c) for c in candidates], n=1)
    return f"; did you mean {match[0]}? " if match else "; "


def check_overrides(cfg: DictConfig, overrides: Sequence[str], config_name: str) -> None:
    """Refuse each ``+key=value`` / ``++key=value`` of ``overrides`` whose key no code of the command reads (module
    docstring). ``cfg``: the config composed with ``overrides``; a ``++`` on a key that exists is an ordinary override.
    """
    added = _added(overrides)
    if not added:
        return
    base = _base(config_name, overrides, [_key(o) for o in added])
    final = OmegaConf.to_container(cfg, resolve=False)
    for override in added:
        _check_added(_key(override), override.input_line, base, final, config_name)


def _builds(node) -> bool:
    """Whether a config node is built by ``hydra.utils.instantiate`` (it has a ``_target_``)."""
    return isinstance(node, dict) and "_target_" in node


def _check_added(key: str, text: str, base: dict, final: dict, config_name: str) -> None:
    """Refuse one added ``key`` (override ``text``) that no code reads: see the module docstring."""
    parts = key.split(".")
    depth, node = 0, base
    while depth < len(parts) and isinstance(node, dict) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    if depth == len(parts) or any(key == p or key.startswith(p + ".") for p in OPEN_NODES.get(config_name, ())):
        return  # an existing setting, or one a consumer checks
    attach, name = ".".join(parts[:depth]), parts[depth]
    built = [d for d in range(depth + 1) if _builds(_lookup(final, ".".join(parts[:d])))]  # nodes with _target_
    if built and built[-1] < depth:
        return  # inside the value of an existing argument (callbacks.generative_metrics.options): its callee's
    parent = _lookup(final, attach)
    if built:  # a new argument of the object the node builds
        return _check_argument(parent["_target_"], name, text)
    if attach in COLLECTIONS:
        entry = parent.get(name) if isinstance(parent, dict) else None
        if not _builds(entry):
            raise ValueError(f"{text}: {attach}.{name} is not an entry of {attach}, and a new one is built from its "
                             f"class; allowed: +{attach}.{name}._target_=<class> with it, or an existing entry: "
                             f"{', '.join(_lookup(base, attach) or {})}")
        return _check_argument(entry["_target_"], parts[depth + 1], text) if depth + 1 < len(parts) else None
    raise _unread(text, key, attach, name, base, final, config_name)


def _unread(text: str, key: str, attach: str, name: str, base: dict, final: dict, config_name: str) -> ValueError:
    """The error for an added ``key`` nothing reads: the checkpoint's (``CHECKPOINT``), else a did-you-mean over
    the keys at its level (``attach``: where it would go, ``name``: its first new part)."""
    command = COMMANDS.get(config_name, config_name)
    setting, fixed = CHECKPOINT.get(config_name, (None, ()))
    if not attach and name in fixed:
        return ValueError(f"{text}: the {name} of a loaded model comes from the checkpoint file ({setting}="
                          f"{final.get(setting)}), so lightning-diff {command} cannot change it and would only record "
                          f"it; allowed: drop {text} (another {name}: train a model with it, lightning-diff train "
                          f"{name}=...)")
    siblings = list(_lookup(base, attach) or {})
    return ValueError(f"{text}: lightning-diff {command} has no setting {key!r}, so nothing would read it (a '+' adds "
                      f"a key unchecked){_did_you_mean(name, siblings)}allowed: "
                      f"{', '.join(siblings)} {'under ' + attach if attach else 'at the top level'}")


def _callable(target: str):
    """The object a ``_target_`` names, or None when it cannot be imported here (instantiate will say why)."""
    return pydoc.locate(target)


def _parameters(fn) -> list[str] | None:
    """The keyword arguments ``fn`` takes, or None when it takes any (``**kwargs``) or is unknown."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_argument(target: str, name: str, text: str) -> None:
    """Refuse a new argument ``name`` that the class or function ``target`` does not take (did-you-mean over those)."""
    fn = _callable(target)
    params = None if fn is None else _parameters(fn)
    if params is None or name in params or name in HYDRA_KEYS:
        return
    raise ValueError(f"{text}: {target} takes no argument {name!r}, so nothing would read it"
                     f"{_did_you_mean(name, params)}allowed: {', '.join(params)}")


# ------------------------------------------------------------------------------------------------ values

def check_settings(cfg: DictConfig, config_name: str) -> None:
    """Refuse numeric and enum settings ``RULES`` does not allow, a sampler ``SamplerSettings`` refuses, and
    ``_target_`` arguments whose value is not of their annotated type; ValueError naming the setting, its value and
    what is allowed."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    for key, rule in RULES.get(config_name, {}).items():
        value = _lookup(values, key, default=_ABSENT)
        if value is not _ABSENT and not rule.test(value):
            raise ValueError(f"{key}={value!r} is invalid; allowed: {rule.allowed}")
    for check in CROSS_CHECKS.get(config_name, ()):
        check(values)
    if (values.get("sampler") or {}).get("name") is not None:  # null: the model's own, known once it is loaded
        sampler = SamplerSettings.from_config(values["sampler"])
        _check_values(sampler.options, SAMPLERS[sampler.name], "sampler.options", f"sampler={sampler.name}")
    if isinstance(values.get("trainer"), dict):
        world_size(cfg.trainer)  # trainer.devices
    for path, node in _targets(values):
        fn = _callable(node["_target_"])
        if fn is not None:
            _check_values(node, fn, path, node["_target_"])


def _targets(tree, path: str = ""):
    """``(path, node)`` of every node with a ``_target_`` in nested dicts and lists, outermost first."""
    if isinstance(tree, dict):
        if _builds(tree):
            yield path, tree
        for key, value in tree.items():
            yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _targets(value, f"{path}[{index}]")


def _check_values(node: Mapping, fn: Callable, path: str, owner: str) -> None:
    """Each scalar of ``node`` against the annotation of ``fn``'s argument of that name (None: a default to fill)."""
    hints = _annotations(fn)
    for key, value in node.items():
        annotation = hints.get(key)
        if annotation is None or value is None or key in HYDRA_KEYS or isinstance(value, (dict, list)):
            continue
        if not _accepts(annotation, value):
            raise ValueError(f"{path}.{key}={value!r} is invalid; allowed: {_describe(annotation)} (the type of "
                             f"{owner}'s argument {key})")


def _annotations(fn: Callable) -> dict:
    """``{argument: annotation}`` of ``fn`` (strings evaluated), ``{}`` when they cannot be evaluated here."""
    try:
        parameters = inspect.signature(fn, eval_str=True).parameters
    except Exception:  # an annotation naming what its module imports for type checkers only: types unknown
        return {}
    return {name: p.annotation for name, p in parameters.items() if p.annotation is not p.empty}


_real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
# An ``int`` annotation lets floats through: lr ramp-ups are fractional steps (optim.constant's warmup_steps); RULES
# hold the settings that must be whole.
_SCALARS = {bool: lambda v: isinstance(v, bool), int: _real, float: _real, str: lambda v: isinstance(v, str),
            type(None): lambda v: v is None}
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _accepts(annotation, value) -> bool:
    """Whether ``value`` is of the scalar type ``annotation`` names (unions, Optional, Literal); any other type
    (containers, classes) is left to the code that receives it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    test = _SCALARS.get(annotation)
    return True if test is None else test(value)


def _describe(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal:
        return ", ".join(map(str, args))
    return _WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))
