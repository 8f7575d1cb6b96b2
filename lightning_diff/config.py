"""Where the Hydra configs live and how they are composed: a leaf module that every entry point imports.

- ``CONFIG_DIR``: the ``configs/`` folder inside the package (``train.yaml``, ``sample.yaml``, ``evaluate.yaml``
  and their groups), installed with it; a user adds their own config folder with ``--config-dir`` or
  ``hydra.searchpath``.
- ``compose(overrides, config_name)``: the config ``lightning-diff <command> [overrides]`` would run, for
  tests and notebooks.
- the resolvers ``${wandb_offline:}``, ``${run_id:}`` (6 random hex digits, one per process),
  ``${group_options:<group>}`` (the options of a config group, for the ``--help`` texts), ``${auto_accelerator:}``
  and ``${auto_precision:}`` (``trainer=auto``; ``${auto_precision:native_bf16}``: bf16 also on a CPU with bf16
  units), registered on import;
- the paper presets' batch and length resolvers (``configs/experiment/<paper>_*.yaml``): a preset states the
  paper's ``global_batch_size`` (over all processes) and optionally ``max_batch_per_process`` (memory only);
  ``${batch_per_process:}`` and ``${grad_accumulation:}`` give ``data.batch_size`` and
  ``trainer.accumulate_grad_batches`` from the trainer's ``devices x num_nodes``, ``${steps_for_images:N}``
  the exact optimizer steps of ``N`` images (lr ramp-ups: may be fractional) and ``${max_steps_for_images:N}``
  the training length (whole steps: training stops at the first step that has seen ``N`` images, as EDM's
  ``training_loop.py``). ``check_global_batch(cfg)`` refuses a run whose batch no longer adds up;
- ``apply_smoke(cfg)``: a ``+smoke=cpu`` run (``configs/smoke/cpu.yaml``) shrinks the network to the widths
  listed under ``smoke.network``, whatever the network class.

It imports nothing else of the package, so any module can use it without an import cycle.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["CONFIG_DIR", "compose", "register_resolvers", "wandb_offline", "group_options", "world_size",
           "split_global_batch", "check_global_batch", "apply_smoke", "smoke_alias"]

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is configured or ``WANDB_MODE=online`` is asked for."""
    if os.environ.get("WANDB_MODE") == "online":
        return False
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return True
    return not os.environ.get("WANDB_API_KEY")


def group_options(group: str) -> str:
    """The options of config group ``group`` (``configs/<group>/*.yaml``), comma-separated."""
    return ", ".join(sorted(path.stem for path in Path(CONFIG_DIR, group).glob("*.yaml")))


def auto_accelerator() -> str:
    """``trainer=auto``'s accelerator: ``gpu`` when CUDA is available, else ``cpu`` (Apple's MPS lacks the
    float64 that sampler state uses, so it is not picked)."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX-BF16, read from Linux's ``cpuinfo``
    flags; False where that file is absent). There oneDNN's bf16 convolutions beat fp32 (the demo's U-Net step
    1.24x, benchmarks/README.md); without these units bf16 autocast is emulated and 2-3x slower than fp32."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(cpu: str = "fp32") -> str:
    """``trainer=auto``'s precision: on a GPU, bf16 autocast of the backbone where the GPU computes in bf16
    (Ampere and newer), else fp16 with loss scaling. On the CPU, ``cpu``: ``fp32`` (``${auto_precision:}``: full
    fp32) or ``native_bf16`` (``${auto_precision:native_bf16}``: bf16 autocast where the CPU has bf16 units,
    :func:`cpu_has_native_bf16`, else fp32; a preset asks for it where it measured the gain, as the demo's)."""
    import torch

    if cpu not in ("fp32", "native_bf16"):
        raise ValueError(f"auto_precision: cpu={cpu!r}; allowed: fp32, native_bf16")
    if not torch.cuda.is_available():
        return "bf16-mixed" if cpu == "native_bf16" and cpu_has_native_bf16() else "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"


def world_size(trainer) -> int:
    """Processes that train together: ``trainer.devices x trainer.num_nodes`` as Lightning reads ``devices``
    (an int, a list of device ids, ``"0,1"``, or ``-1`` / ``"auto"``: every visible GPU, one CPU process)."""
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, str):
        devices = devices.strip()
        devices = (int(devices) if devices.lstrip("-").isdigit() else
                   devices if devices == "auto" else [d for d in devices.split(",") if d.strip()])
    if not isinstance(devices, (int, str)):
        return len(devices) * nodes
    if devices in (-1, "auto"):
        import torch

        gpu = str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return (torch.cuda.device_count() if gpu else 1) * nodes
    if devices < 1:
        raise ValueError(f"trainer.devices={devices} is invalid; allowed: an integer >= 1, -1, auto, a list of ids")
    return devices * nodes


def split_global_batch(global_batch_size: int, processes: int, max_batch_per_process: int | None = None
                       ) -> tuple[int, int]:
    """``(batch per process, gradient accumulation)`` whose product with ``processes`` is exactly
    ``global_batch_size``: the smallest accumulation that keeps the per-process batch within
    ``max_batch_per_process`` (None: no limit) and divides it exactly (EDM ``training_loop.py``, ``batch_gpu``)."""
    if type(global_batch_size) is not int or global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r} is invalid; allowed: an integer >= 1")
    if global_batch_size % processes:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {processes} training "
                         f"processes (trainer.devices x trainer.num_nodes); allowed: a multiple of {processes}, "
                         f"or devices x num_nodes dividing {global_batch_size}")
    total = global_batch_size // processes
    if max_batch_per_process is None or max_batch_per_process >= total:
        return total, 1
    if type(max_batch_per_process) is not int or max_batch_per_process < 1:
        raise ValueError(f"max_batch_per_process={max_batch_per_process!r} is invalid; allowed: an integer >= 1, "
                         "null")
    accumulation = next(a for a in range(math.ceil(total / max_batch_per_process), total + 1) if total % a == 0)
    return total // accumulation, accumulation


def _preset_split(root) -> tuple[int, int]:
    return split_global_batch(root.global_batch_size, world_size(root.trainer), root.get("max_batch_per_process"))


def _steps_for_images(images: float, *, _root_) -> float:
    return images / _root_.global_batch_size


def _max_steps_for_images(images: float, *, _root_) -> int:
    return math.ceil(images / _root_.global_batch_size)


def check_global_batch(cfg: DictConfig) -> None:
    """When the run states ``global_batch_size``, the images of one optimizer step must add up to it
    (``data.batch_size x processes x trainer.accumulate_grad_batches``); an override of one of them alone
    would change the paper's recipe silently."""
    if cfg.get("global_batch_size") is None:
        return
    batch, accumulation = cfg.data.batch_size, cfg.trainer.get("accumulate_grad_batches", 1)
    processes = world_size(cfg.trainer)
    if batch * processes * accumulation != cfg.global_batch_size:
        raise ValueError(f"data.batch_size={batch} x {processes} processes x trainer.accumulate_grad_batches="
                         f"{accumulation} = {batch * processes * accumulation} images per optimizer step, but "
                         f"global_batch_size={cfg.global_batch_size}; allowed: set global_batch_size (and "
                         "max_batch_per_process) and leave data.batch_size and accumulate_grad_batches to it")


def apply_smoke(cfg: DictConfig) -> dict:
    """Set each ``smoke.network`` width that the run's network config has (``+smoke=cpu``); returns what was
    set (``{}`` when the run is no smoke run). Keys the network lacks are left alone, so one list serves
    SongUNet, ADM, DiT and the CPU networks."""
    widths = OmegaConf.select(cfg, "smoke.network")
    if widths is None:
        return {}
    changed = {key: value for key, value in widths.items() if key in cfg.network}
    with open_dict(cfg):
        cfg.network.merge_with(changed)
    return changed


def smoke_alias(overrides: Sequence[str]) -> list[str]:
    """``+smoke=true`` (the spelling experiments/presets.md uses) as ``+smoke=cpu``: Hydra parses ``true`` as a
    boolean, which cannot name a config of the group ``configs/smoke``; every entry point passes its overrides through
    here."""
    return ["+smoke=cpu" if o.lower() in ("+smoke=true", "smoke=true") else o for o in overrides]


def register_resolvers() -> None:
    """Register the resolvers the configs use (idempotent)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("run_id"):  # run directories: runs started in the same second differ
        OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("group_options"):
        OmegaConf.register_new_resolver("group_options", group_options)
    for name, resolver in (("auto_accelerator", auto_accelerator), ("auto_precision", auto_precision),
                           ("batch_per_process", lambda *, _root_: _preset_split(_root_)[0]),
                           ("grad_accumulation", lambda *, _root_: _preset_split(_root_)[1]),
                           ("steps_for_images", _steps_for_images),
                           ("max_steps_for_images", _max_steps_for_images)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``lightning-diff <config_name> [overrides]`` would run (``train``, ``sample`` or ``evaluate``).

    Hydra makes no run directory here: pass ``paths.output_dir=...`` for training. The ``hydra:`` resolver
    (run names) answers from this composition; the ``hydra`` node itself is removed."""
    from hydra import compose as compose_config
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose_config(config_name, overrides=smoke_alias(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


register_resolvers()
