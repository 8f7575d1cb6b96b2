"""``lightning_diff.pretrained.load`` / ``load_pretrained``: format inference from the file (suffix, keys, folder
layout), ``format=`` forcing, flags passed through, errors naming the allowed formats; the format loaders are
replaced by recording stubs (their own proofs are in test_pretrained_<format>.py)."""

import collections
import hashlib
import json
import sys
import types

import pytest
import torch

from lightning_diff import pretrained
from lightning_diff.denoiser import Denoiser
from lightning_diff.formulations import EDM
from lightning_diff.pretrained import Pretrained


@pytest.fixture
def calls(monkeypatch):
    """Every format module replaced by a stub recording ``(format, path, map_location, flags)``."""
    seen = []
    for name, module_name in pretrained.FORMATS.items():
        def load(path, *, map_location="cpu", _name=name, **flags):
            seen.append((_name, path, map_location, flags))
            denoiser = Denoiser(torch.nn.Identity(), EDM()).train()
            return Pretrained(denoiser=denoiser, data_shape=(3, 8, 8), num_classes=0, format=_name, source=str(path))
        monkeypatch.setitem(sys.modules, module_name, types.SimpleNamespace(load=load))
    return seen


def _save(path, state):
    torch.save(state, path)
    return path


ADM_KEYS = {"time_embed.0.weight": torch.zeros(2, 2), "input_blocks.0.0.weight": torch.zeros(2, 3, 3, 3)}
DIT_KEYS = {"x_embedder.proj.weight": torch.zeros(2, 4, 2, 2), "blocks.0.adaLN_modulation.1.weight": torch.zeros(2)}


def test_format_is_inferred_from_the_file(calls, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    sources = {
        "edm": tmp_path / "net.pkl",
        "adm": _save(tmp_path / "adm.pt", ADM_KEYS),
        "dit": _save(tmp_path / "dit.pt", collections.OrderedDict(DIT_KEYS)),
        "dit_nested": _save(tmp_path / "dit-train.pth", {"model": DIT_KEYS, "ema": DIT_KEYS, "args": None}),
        "diffusers": tmp_path / "pipe",
        "diffusers_model": tmp_path / "unet",
    }
    sources["edm"].write_bytes(b"not read by the stub")
    for expected, path in sources.items():
        pretrained.load_pretrained(path)
        assert calls[-1][:2] == (expected.split("_")[0], path)


def test_load_returns_the_denoiser_in_eval_mode_and_passes_flags(calls, tmp_path):
    path = _save(tmp_path / "adm.pt", ADM_KEYS)
    denoiser = pretrained.load(str(path), map_location="meta", image_size=64, attention_resolutions="32,16,8")
    assert isinstance(denoiser, Denoiser) and not denoiser.training
    assert calls[-1] == ("adm", path, "meta", {"image_size": 64, "attention_resolutions": "32,16,8"})


def test_format_flag_forces_and_unknown_formats_are_refused(calls, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot tell its format .*allowed formats: edm, adm, dit, diffusers; "
                                         r"force one with format=NAME \(command line: pretrained.format=NAME\)"):
        pretrained.load(path)
    pretrained.load(path, format="dit")
    assert calls[-1][:2] == ("dit", path)
    with pytest.raises(ValueError, match="format='ckpt' is not known; allowed: edm, adm, dit, diffusers"):
        pretrained.load(path, format="ckpt")
    with pytest.raises(ValueError, match="cannot tell its format"):
        pretrained.load(tmp_path)  # a folder without model_index.json / config.json


RAN = []


class _Payload:
    """Unpickling it would call RAN.append: what a malicious pickle does."""

    def __reduce__(self):
        return RAN.append, ("ran",)


def test_pt_with_a_refused_global_is_not_sniffed_by_running_it(calls, tmp_path):
    path = _save(tmp_path / "evil.pt", {"x_embedder.proj.weight": _Payload()})
    with pytest.raises(ValueError, match=r"evil.pt asks for builtins.getattr outside torch.load's weights_only "
                                         r"allowlist.*refused, since loading it could run code"):
        pretrained.load(path)
    assert RAN == [] and calls == []


def test_sha256_flag_is_checked_before_the_loader_runs(calls, tmp_path):
    path = _save(tmp_path / "adm.pt", ADM_KEYS)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    pretrained.load(path, sha256=digest.upper())
    assert calls[-1][3] == {}  # consumed, not passed to the loader
    with pytest.raises(Exception, match=f"does not match {'0' * 64} from sha256="):
        pretrained.load(path, sha256="0" * 64)
    assert len(calls) == 1


def test_missing_source_names_it(calls, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        pretrained.load(tmp_path / "absent.pkl")
    assert json.dumps(list(pretrained.FORMATS)) == '["edm", "adm", "dit", "diffusers"]'
