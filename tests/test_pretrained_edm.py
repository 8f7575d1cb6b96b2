"""NVlabs/edm pickles (``lightning_diff.pretrained.edm``): equal to EDM's own code on the same weights, and
loading never runs the pickle's embedded source.

Oracle: the official ``training/networks.py`` in ../shared/reference/edm (skipped when absent), tiny widths,
every parameter perturbed (``tests/pretrained_fixtures.py``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys

import pytest
import torch

from lightning_diff.checkpoint_io import CheckpointError
from lightning_diff.pretrained.edm import load

from .pretrained_fixtures import edm_networks, reference_or_skip, write_edm_pickle

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread

SIGMAS = (0.002, 0.02, 0.2, 2.0, 20.0, 80.0)  # the range of noise levels
TOLERANCE = 1e-5  # max |ours - EDM| / max |EDM|, float32

# Tiny EDM architectures (EDM's names): DDPM++ and NCSN++ as EDM's CIFAR-10 configs (train.py --arch), ADM with
# 128 channels at 4x4 so that its attention there has 2 heads of 64 (EDM's DhariwalUNet has none below 64).
ARCHS = {
    "ddpmpp": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    "ncsnpp": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                                resample_filter=[1, 3, 3, 1])),
    "ncsnpp-skip": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4],
                                     embedding_type="fourier", channel_mult_noise=2, encoder_type="skip",
                                     decoder_type="skip", resample_filter=[1, 3, 3, 1])),
    "adm": ("DhariwalUNet", dict(model_channels=32, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[4])),
}
# Each preconditioner with constants away from EDM's defaults, so that a constant not read from the pickle shows.
PRECONDS = {
    "EDMPrecond": dict(sigma_data=0.6),
    "VPPrecond": dict(beta_d=18.0, beta_min=0.2, M=500, epsilon_t=1e-4),
    "VEPrecond": dict(sigma_min=0.01, sigma_max=50.0),
    "iDDPMPrecond": dict(C_1=0.002, C_2=0.01, M=400),
}
# (label_dim, augment_dim) per variant: conditional / not, with EDM's 9 augmentation labels / without.
CONDITIONS = {"uncond": (0, 0), "cond-aug9": (4, 9)}


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _trained_level(ref_net, sigma: float) -> torch.Tensor:
    """``sigma`` itself, or for iDDPM the nearest of the M levels u_0 .. u_(M-1) it was trained on. EDM's
    ``round_sigma`` also knows u_M = 0 and feeds c_noise = -1 (an untrained level) for 0 < sigma < u_(M-1) / 2;
    ours feeds u_(M-1)'s c_noise = 0 there (EDM's samplers never go below u_(M-1), ``net.sigma_min``)."""
    sigma = torch.tensor(sigma)
    if not hasattr(ref_net, "u"):
        return sigma
    return ref_net.u[:-1][(ref_net.u[:-1] - sigma).abs().argmin()]


def _compare(ref_net, denoiser, label_dim: int, augment_dim: int, seed: int = 0) -> float:
    """Max relative error of D and of the network output F (same inputs) over ``SIGMAS``, with labels and
    with ``labels=None``; iDDPM nets at the grid levels EDM's ``round_sigma`` snaps ``SIGMAS`` to."""
    gen = torch.Generator().manual_seed(seed)
    captured = {}
    hooks = [module.register_forward_hook(lambda m, i, o, key=key: captured.__setitem__(key, o))
             for key, module in (("ref", ref_net.model), ("ours", denoiser.backbone))]
    labels = torch.arange(3) % label_dim if label_dim else None
    worst = 0.0
    try:
        for sigma in SIGMAS:
            sigma = _trained_level(ref_net, sigma)
            x = torch.randn(3, 3, 8, 8, generator=gen) * max(1.0, float(sigma))
            cond = {"augment_labels": torch.randn(3, augment_dim, generator=gen)} if augment_dim else {}
            for lab in ([labels, None] if label_dim else [None]):
                one_hot = None if lab is None else torch.nn.functional.one_hot(lab, label_dim).float()
                ref = ref_net(x, sigma.expand(3), one_hot, **cond)
                ours = denoiser(x, sigma.expand(3), lab, **cond)
                assert ours.dtype == torch.float32
                worst = max(worst, _relative(ours, ref), _relative(captured["ours"], captured["ref"]))
    finally:
        for hook in hooks:
            hook.remove()
    return worst


@pytest.mark.parametrize("condition", list(CONDITIONS))
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("precond", list(PRECONDS))
def test_edm_pickle_equals_reference(tmp_path, precond, arch, condition):
    """Our D (and backbone output) on an EDM pickle equals EDM's forward to 1e-5 relative in float32."""
    model_type, model_kwargs = ARCHS[arch]
    label_dim, augment_dim = CONDITIONS[condition]
    ref = write_edm_pickle(tmp_path / "net.pkl", precond, model_type, label_dim=label_dim, augment_dim=augment_dim,
                           **PRECONDS[precond], **model_kwargs)
    pretrained = load(tmp_path / "net.pkl")
    error = _compare(ref, pretrained.denoiser, label_dim, augment_dim)
    print(f"{precond} {arch} {condition}: max relative error {error:.2e}")
    assert error < TOLERANCE
    assert pretrained.data_shape == (3, 8, 8) and pretrained.num_classes == label_dim
    assert pretrained.format == "edm" and pretrained.config["precond"] == precond


def test_formulation_has_the_pickles_constants(tmp_path):
    """The formulation carries the preconditioner's constants; EDMPrecond's unlimited range (0, inf) becomes
    EDM generate.py's sampling range [0.002, 80]; the iDDPM grid equals EDM's u (float32)."""
    expected = {
        "EDMPrecond": ("edm", dict(sigma_data=0.6, sigma_min=0.002, sigma_max=80.0)),
        "VPPrecond": ("vp", dict(beta_d=18.0, beta_min=0.2, num_timesteps=500, epsilon_t=1e-4)),  # EDM's M
        "VEPrecond": ("ve", dict(sigma_min=0.01, sigma_max=50.0)),
        "iDDPMPrecond": ("iddpm", dict(C_1=0.002, C_2=0.01, num_timesteps=400)),
    }
    model_type, model_kwargs = ARCHS["ddpmpp"]
    for precond, (name, constants) in expected.items():
        ref = write_edm_pickle(tmp_path / f"{precond}.pkl", precond, model_type, **PRECONDS[precond], **model_kwargs)
        pretrained = load(tmp_path / f"{precond}.pkl")
        formulation = pretrained.denoiser.formulation
        assert formulation.name == name
        for key, value in constants.items():
            assert getattr(formulation, key) == pytest.approx(value, rel=1e-12), (precond, key)
        if name == "iddpm":  # same levels (EDM's float32 recursion drifts to 2e-4 at u_(M-1)), same c_noise
            torch.testing.assert_close(formulation.u.float(), ref.u, rtol=1e-3, atol=0)
            levels = ref.u[:-1].double()
            torch.testing.assert_close(formulation.c_noise(levels), ref.M - 1 - torch.arange(ref.M).double())
        assert pretrained.denoiser.float32_preconditioning and not pretrained.denoiser.variance_trained


def test_bare_net_pickle_and_snapshot_agree(tmp_path):
    """A pickle of the net alone loads like EDM's training snapshot dict."""
    model_type, model_kwargs = ARCHS["ddpmpp"]
    ref = write_edm_pickle(tmp_path / "bare.pkl", "EDMPrecond", model_type, label_dim=4, snapshot=False,
                           **model_kwargs)
    assert _compare(ref, load(tmp_path / "bare.pkl").denoiser, 4, 0) < TOLERANCE


def test_loads_without_nvlabs_modules(tmp_path, monkeypatch):
    """With ``dnnlib``/``torch_utils``/``training`` unimportable (off ``sys.path``, blocked in ``sys.modules``) the
    pickle loads, equal to EDM, and no module is created from its embedded source."""
    model_type, model_kwargs = ARCHS["ncsnpp"]
    ref = write_edm_pickle(tmp_path / "net.pkl", "VPPrecond", model_type, label_dim=4, **model_kwargs)
    nvlabs = ("dnnlib", "torch_utils", "training")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "reference" not in p])
    for name in [m for m in sys.modules if m.split(".")[0] in nvlabs]:
        monkeypatch.delitem(sys.modules, name)
    for name in nvlabs:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    before = set(sys.modules)
    denoiser = load(tmp_path / "net.pkl").denoiser
    assert all(sys.modules[name] is None for name in nvlabs)
    assert not [m for m in set(sys.modules) - before if m.startswith("_imported_module_")]
    monkeypatch.undo()
    assert _compare(ref, denoiser, 4, 0) < TOLERANCE


class _RunsOnLoad:
    """Pickles as ``callable(*args)``: what a crafted pickle asks the loader to call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn, global_name", [(os.system, f"{os.name}.system"), (eval, "builtins.eval")])
def test_refuses_globals_outside_the_allowlist(tmp_path, fn, global_name):
    """(a) A pickle calling os.system / eval: an error naming the file and the global; nothing ran."""
    marker = tmp_path / "ran"
    arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _RunsOnLoad(fn, arg)}))
    with pytest.raises(CheckpointError, match=rf"{path}.*{global_name}"):
        load(path)
    assert not marker.exists()


def test_never_executes_the_embedded_source(tmp_path, monkeypatch):
    """(b) A genuine EDM pickle whose embedded module source writes a file when executed: EDM's own loader
    runs it (so the test can fail), ours loads the network and never runs it."""
    networks = edm_networks()
    model_type, model_kwargs = ARCHS["ddpmpp"]
    ref = write_edm_pickle(tmp_path / "net.pkl", "EDMPrecond", model_type, **model_kwargs)
    marker = tmp_path / "ran"
    evil_source = f"open({str(marker)!r}, 'w').close()\n" + networks.EDMPrecond._orig_module_src
    monkeypatch.setattr(networks.EDMPrecond, "_orig_module_src", evil_source)
    with open(tmp_path / "net.pkl", "wb") as f:  # pickled as is (a deepcopy would already run the source)
        pickle.dump(ref, f)

    assert _compare(ref, load(tmp_path / "net.pkl").denoiser, 0, 0) < TOLERANCE
    assert not marker.exists()

    reference_or_skip("edm")
    with contextlib.suppress(Exception), open(tmp_path / "net.pkl", "rb") as f:
        pickle.load(f)  # EDM's way: torch_utils.persistence exec()s module_src
    assert marker.exists()


def test_errors_name_file_and_setting(tmp_path):
    """Flags, a pickle that holds no network, and an EDM DhariwalUNet narrower than its 64-channel heads."""
    model_type, model_kwargs = ARCHS["ddpmpp"]
    write_edm_pickle(tmp_path / "net.pkl", "EDMPrecond", model_type, **model_kwargs)
    with pytest.raises(CheckpointError, match=r"net\.pkl.*no flags.*image_size"):
        load(tmp_path / "net.pkl", image_size=8)
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match=r"other\.pkl holds a dict with keys \['weights'\]"):
        load(tmp_path / "other.pkl")
    write_edm_pickle(tmp_path / "narrow.pkl", "EDMPrecond", "DhariwalUNet", model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[4])
    with pytest.raises(CheckpointError, match=r"narrow\.pkl.*64"):
        load(tmp_path / "narrow.pkl")
