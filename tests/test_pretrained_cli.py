"""``lightning-diff sample`` / ``evaluate`` on released checkpoints: NVlabs/edm's own images for seeds 0-7 with
``seed_protocol=edm``, class labels, guidance and latent-model errors, published FID reference files."""

import contextlib
import hashlib
import sys

import numpy as np
import pytest
import torch

from lightning_diff import cli
from lightning_diff.cli.evaluate import evaluate
from lightning_diff.data.transforms import to_uint8
from lightning_diff.denoiser import Denoiser
from lightning_diff.evaluation import generate
from lightning_diff.evaluation.metrics import Extractors, fid_helper_weights_path, load_published_reference
from lightning_diff.formulations import EDM
from lightning_diff.sampling import PerSampleGenerator, initial_labels, initial_noise
from lightning_diff.training.builders import load_module
from lightning_diff.training.module import DiffusionModule
from tests.helpers import compose_config
from tests.pretrained_fixtures import perturb_, reference_or_skip, write_edm_pickle


# --- the oracle: NVlabs/edm generate.py (StackedRandomGenerator, edm_sampler, the uint8 conversion), transcribed ----
class StackedRandomGenerator:  # NVlabs/edm generate.py, verbatim but for formatting
    def __init__(self, device, seeds):
        super().__init__()
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):  # NVlabs/edm generate.py
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])  # t_N = 0
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):  # 0, ..., N-1
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@contextlib.contextmanager
def one_thread():
    """Tiny networks on a shared 2-core machine: one intra-op thread is ~15x faster than two competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def edm_generate(net, seeds, device="cpu"):
    """generate.py's loop body for one batch: latents, class labels, edm_sampler, the uint8 images and labels."""
    with one_thread():
        return _edm_generate(net, seeds, device)


def _edm_generate(net, seeds, device):
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels, drawn = None, None
    if net.label_dim:
        drawn = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        class_labels = torch.eye(net.label_dim, device=device)[drawn]
    images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like)
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu().numpy(), drawn


# --- tests -------------------------------------------------------------------------------------------------------
TINY_SONG_UNET = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[8], dropout=0.0)


@pytest.fixture(scope="module")
def edm_cond(tmp_path_factory):
    """A tiny conditional EDMPrecond(SongUNet) pickled as EDM's training loop does, and the reference net."""
    path = tmp_path_factory.mktemp("edm") / "edm-tiny-cond.pkl"
    net = write_edm_pickle(path, precond="EDMPrecond", model_type="SongUNet", label_dim=4, img_resolution=8,
                           **TINY_SONG_UNET)
    return path, net


def test_edm_protocol_draws_generate_py_latents_and_labels():
    """Seeds beyond 2**32 wrap as EDM's manual_seed(seed % (1 << 32)); latents are float32 draws cast to float64."""
    seeds = [0, 7, 2**32 + 5, 123456789]
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([4, 3, 8, 8])
    labels = rnd.randint(10, size=[4])
    ours = PerSampleGenerator(seeds, protocol="edm")
    x = initial_noise(ours, (3, 8, 8), 80.0)
    assert x.dtype == torch.float64
    assert torch.equal(x, latents.to(torch.float64) * torch.tensor(80.0, dtype=torch.float64))
    assert torch.equal(initial_labels(ours, 10), labels)
    default = initial_noise(PerSampleGenerator(seeds), (3, 8, 8), 80.0)  # the default protocol is unchanged
    assert torch.equal(default[0], 80.0 * torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.float64))


def test_sample_cli_reproduces_edm_images_for_seeds_0_to_7(edm_cond, tmp_path, monkeypatch):
    """The issue's Done criterion: `lightning-diff sample ckpt=<EDM pickle> seed_protocol=edm` gives the uint8 images
    of NVlabs/edm's generate.py (Heun, 18 steps, rho 7, S_churn 0) for seeds 0-7, and the labels it draws."""
    path, net = edm_cond
    expected, expected_labels = edm_generate(net, list(range(8)))
    out = tmp_path / "samples"
    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    with one_thread():  # as the oracle; in-process: the console script's own path without a second interpreter
        cli.main(["sample", f"ckpt={path}", "seed_protocol=edm", "num_samples=8", "seed=0", "sampler=heun",
                  "sampler.steps=18", "device=cpu", f"out={out}", "sampler.batch_size=3"])
    result = np.load(out / "samples.npz")
    images = result["images"]
    assert images.shape == expected.shape == (8, 3, 8, 8)
    differ = images != expected
    print(f"pixels that differ: {int(differ.sum())} of {differ.size}; max |diff| "
          f"{int(np.abs(images.astype(int) - expected.astype(int)).max())} levels")
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(result["labels"], expected_labels.numpy())


@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond"])
def test_sample_cli_without_sampler_settings_runs_generate_py_on_vp_and_ve_pickles(precond, tmp_path, monkeypatch):
    """generate.py samples every preconditioner on EDM's time steps (rho 7 between max(0.002, net.sigma_min) and
    min(80, net.sigma_max)), not the VP/VE formulations' own grids: the pickle's source sampler, with no sampler
    flag."""
    path = tmp_path / f"{precond}.pkl"
    net = write_edm_pickle(path, precond=precond, model_type="SongUNet", img_resolution=8, **TINY_SONG_UNET)
    expected, _ = edm_generate(net, list(range(3)))
    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    with one_thread():
        cli.main(["sample", f"ckpt={path}", "seed_protocol=edm", "num_samples=3", "device=cpu",
                  f"out={tmp_path / 'out'}"])
    images = np.load(tmp_path / "out" / "samples.npz")["images"]
    print(f"{precond}: {int((images != expected).sum())} of {images.size} pixels differ")
    np.testing.assert_array_equal(images, expected)


def test_fixed_class_label_and_guidance_errors(edm_cond):
    """class_label fixes every label (EDM still draws one per seed first, so the images equal generate.py's
    --class run); guidance on EDM's conditional pickles is refused: they were trained with label_dropout=0, so their
    all-zero label (our null row) was never seen in training."""
    path, net = edm_cond
    module = load_module(str(path))
    assert module.weights == "released" and module.conditional and module.num_classes == 4
    with one_thread():
        samples, labels, _ = generate(module, range(2), class_label=3, progress=False, seed_protocol="edm",
                                  sampler={"name": "heun", "steps": 3})
    assert labels.tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"class_label=9 is invalid; allowed: null or an integer in \[0, 4\)"):
        generate(module, range(2), class_label=9, progress=False)
    with pytest.raises(ValueError, match=r"guidance=2.0: .*null label was never trained \(label_dropout=0 in "
                                         r".*edm-tiny-cond.pkl: format=edm.*allowed: guidance=1"):
        generate(module, range(2), guidance=2.0, progress=False, sampler={"name": "heun", "steps": 3})


class _NoNullLabel(torch.nn.Module):
    """A conditional backbone without an unconditional mode (as ADM's class embedding: no null row)."""

    null_label = None

    def forward(self, x, c_noise, labels=None):
        return torch.zeros_like(x)


def test_guidance_needs_a_null_label():
    module = DiffusionModule(None, None, denoiser=Denoiser(_NoNullLabel(), EDM()), conditional=True, num_classes=4,
                             data_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="guidance=2.0: .*has no null label.*allowed: guidance=1"):
        generate(module, range(2), guidance=2.0, progress=False)


def test_released_checkpoint_refuses_raw_weights_and_stray_flags(edm_cond, tmp_path):
    path, _ = edm_cond
    with pytest.raises(ValueError, match="weights=raw: a released checkpoint"):
        load_module(str(path), weights="raw")
    with pytest.raises(ValueError, match=r"pretrained.image_size=...: pretrained settings apply to released"):
        load_module(str(tmp_path / "last.ckpt"), pretrained={"image_size": 64})  # a lightning-diff train checkpoint


# --- evaluate on a released checkpoint against published statistics ---------------------------------------------
def _published(path, mu, sigma, adm_layout: bool):
    """A statistics file as NVlabs/edm's fid-refs (mu, sigma) or guided-diffusion's reference batch (+ arr_0)."""
    arrays = {"mu": mu, "sigma": sigma}
    if adm_layout:
        arrays.update(arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu_s=np.zeros(7), sigma_s=np.eye(7))
    np.savez(path, **arrays)
    return path


def _evaluate_overrides(ckpt, cache_dir, *extra):
    return [f"ckpt={ckpt}", "sampler.steps=2", "device=cpu", "progress=false", "metrics.num_samples=4",
            "metrics.batch_size=4", "metrics.fid.method=eigvals", f"metrics.cache_dir={cache_dir}", *extra]


@pytest.mark.slow  # Inception on CPU and two 2048-d Fréchet distances: ~2 min on a shared 2-core machine
def test_evaluate_released_model_against_published_statistics(edm_cond, tmp_path):
    """FID against a file is the Fréchet distance to ITS mu and sigma: with the generated images' own moments it is
    0, with the mean moved by delta (same covariance) it is |delta|^2 (Heusel et al. 2017, eq. 6); both layouts are
    read and the record names the file and its SHA-256."""
    path, _ = edm_cond
    module = load_module(str(path))
    samples, labels, _ = generate(module, range(4), sampler={"name": "heun", "steps": 2}, progress=False)
    assert labels.tolist() == [0, 1, 2, 3]  # what the records' protocol says: "labels": "seed % 4"
    extractors = Extractors.build(("fid",), str(fid_helper_weights_path()), device="cpu")
    pool3 = extractors.inception.convert_features_tuple_to_dict(extractors.inception(to_uint8(samples)))["2048"]
    features = pool3.double().numpy()
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    delta = np.zeros(2048)
    delta[:4] = 5.0  # |delta|^2 = 100
    for name, shift, adm_layout, expected in (("edm-ref.npz", 0 * delta, False, 0.0),
                                               ("VIRTUAL_tiny.npz", delta, True, 100.0)):
        ref = _published(tmp_path / name, mu + shift, sigma, adm_layout)
        overrides = _evaluate_overrides(path, tmp_path, f"metrics.reference={ref}", f"name={name}")
        record = evaluate(compose_config("evaluate", overrides))
        assert record["metrics"]["fid"] == pytest.approx(expected, abs=1e-3 * max(expected, 1.0))
        reference = record["protocol"]["samples"]["reference"]
        assert reference["published"] == str(ref.resolve())
        assert reference["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
        assert reference["layout"] == ("guided-diffusion reference batch" if adm_layout else "NVlabs/edm fid-refs")
        assert record["protocol"]["weights"] == "released" and record["protocol"]["pretrained"]["format"] == "edm"
        assert record["protocol"]["samples"]["labels"] == "seed % 4"


def test_evaluate_released_model_needs_data_or_a_statistics_file(edm_cond, tmp_path):
    path, _ = edm_cond
    cfg = compose_config("evaluate", _evaluate_overrides(path, tmp_path))
    with pytest.raises(ValueError, match=r"has no data of its own .*metrics.reference=train needs one: pass "
                                         r"data=<group>.*metrics.reference=/path/to/ref.npz"):
        evaluate(cfg)
    ref = _published(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), adm_layout=False)
    overrides = _evaluate_overrides(path, tmp_path, "metrics=[fid,kid]", "metrics.kid.subset_size=2",
                                    f"metrics.reference={ref}")
    cfg = compose_config("evaluate", overrides)
    with pytest.raises(ValueError, match=r"published statistics \(mu, sigma\) only; .*allowed with a statistics "
                                         r"file: fid, is"):
        evaluate(cfg)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(2048))
    cfg = compose_config("evaluate", _evaluate_overrides(path, tmp_path, f"metrics.reference={bad}"))
    with pytest.raises(ValueError, match=r"bad.npz holds \['mean'\]; allowed: a .npz with mu \[2048\] and sigma"):
        evaluate(cfg)


def test_published_statistics_files_of_both_layouts(tmp_path):
    """NVlabs/edm fid-refs (mu, sigma) and guided-diffusion reference batches (arr_0, mu, sigma, mu_s, sigma_s):
    the moments are the file's own, float64; the record names the file, its SHA-256 and the layout."""
    rng = np.random.default_rng(0)
    mu, root = rng.normal(size=2048).astype(np.float32), rng.normal(size=(2048, 8))
    sigma = root @ root.T
    for name, adm_layout in (("cifar10-32x32.npz", False), ("VIRTUAL_imagenet64_labeled.npz", True)):
        path = _published(tmp_path / name, mu, sigma, adm_layout)
        ref = load_published_reference(path)
        assert ref.stats.mean().dtype == np.float64 and np.array_equal(ref.stats.mean(), mu.astype(np.float64))
        assert np.array_equal(ref.stats.cov(), sigma) and ref.pool3 is None and ref.extractor == f"published:{name}"
        assert ref.meta == {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                            "layout": "guided-diffusion reference batch" if adm_layout else "NVlabs/edm fid-refs"}
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"small.npz: mu \[64\] and sigma \[64, 64\]; allowed: \[2048\] and"):
        load_published_reference(tmp_path / "small.npz")


# --- a latent model (DiT): the decoder flag ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_pt(tmp_path_factory):
    """A tiny class-conditional DiT (facebookresearch/DiT models.py, every weight perturbed) saved as a state dict,
    and a tiny diffusers AutoencoderKL folder (one block: latents and images share their side)."""
    reference_or_skip("dit")
    import models as dit_models
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    net = dit_models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                         num_classes=10, class_dropout_prob=0.1)
    with torch.no_grad():  # off DiT's zero init; pos_embed is its fixed sin-cos table (not trained)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p) if p.requires_grad else 0)
    torch.save(net.state_dict(), folder / "dit-tiny.pt")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    perturb_(vae).save_pretrained(folder / "vae")
    return folder / "dit-tiny.pt", folder / "vae"


def test_latent_model_needs_the_vae_flag_and_decodes_through_it(dit_pt, tmp_path, monkeypatch, capsys):
    """`lightning-diff sample ckpt=<DiT .pt> +pretrained.num_heads=2`: the format is read off its keys; without a
    decoder the error names the vae flag; with `+pretrained.vae=<folder>` the images are diffusers'
    AutoencoderKL.decode(latents / 0.18215) of our latents (DiT's sample.py), rounded as EDM writes PNGs."""
    path, vae_folder = dit_pt
    monkeypatch.setattr(sys, "argv", ["lightning-diff"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    common = ["sample", f"ckpt={path}", "+pretrained.num_heads=2", "num_samples=3", "sampler=ddim", "sampler.steps=4",
              "device=cpu", "guidance=1.5", "class_label=7"]
    with pytest.raises(ValueError, match=r"samples latents of shape \[4, 8, 8\] .*\+pretrained.vae="):
        cli.main([*common, f"out={tmp_path / 'none'}"])
    with one_thread():
        cli.main([*common, f"out={tmp_path / 'decoded'}", f"+pretrained.vae={vae_folder}"])
    result = np.load(tmp_path / "decoded" / "samples.npz")
    assert result["images"].shape == (3, 3, 8, 8) and result["labels"].tolist() == [7, 7, 7]
    module = load_module(str(path), pretrained={"num_heads": 2})
    assert module.decoder is None and module.denoiser.null_label == 10
    from diffusers import AutoencoderKL

    with one_thread():
        latents = module.sample(range(3), labels=torch.full((3,), 7), sampler={"name": "ddim", "steps": 4},
                                guidance=1.5)
        with torch.no_grad():
            decoded = AutoencoderKL.from_pretrained(vae_folder).decode(latents / 0.18215).sample
    expected = (decoded * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(result["images"], expected)
