"""``lightning-diff reference``: a data split's reference statistics computed once, in the cache entry that
``evaluate`` reads (the same key), so evaluate's first run skips them; bad settings are refused by name."""

import pytest

from lightning_diff.cli.config_check import check_settings
from lightning_diff.cli.reference import reference
from lightning_diff.config import compose
from lightning_diff.evaluation.metrics import load_reference
from lightning_diff.evaluation.sample_quality import reference_statistics
from lightning_diff.training.builders import build_datamodule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_command_caches_what_evaluate_reads(tmp_path):
    overrides = ["data=digits", "metrics.reference_num_images=6", f"metrics.cache_dir={tmp_path}", "progress=false",
                 "metrics.batch_size=4"]
    cfg = compose(overrides, "reference")
    check_settings(cfg, "reference")
    line = reference(cfg)
    assert line.startswith("reference statistics digits-train.holdout0.1.seed0.first6-8px-") and "computed in" in line
    assert "already cached" in reference(cfg)  # a second call keeps the entry
    # evaluate's path (sample_quality) finds the entry under the same key, with the features KID needs
    key, cached = reference_statistics(build_datamodule(cfg), "train", ["fid", "kid"], reference_num_images=6,
                                       cache_dir=tmp_path)
    assert cached and key in line
    entry = load_reference(key, key.split("px-", 1)[1], tmp_path)
    assert entry.stats.count == 6 and entry.pool3.shape == (6, 2048)


@pytest.mark.parametrize("override,match", [
    ("metrics.reference_num_images=0", "metrics.reference_num_images=0 is invalid; allowed"),
    ("device=tpu", "device='tpu' is invalid; allowed")])
def test_bad_settings_are_refused_by_name(override, match):
    with pytest.raises(ValueError, match=match):
        check_settings(compose(["data=digits", override], "reference"), "reference")


def test_a_metric_without_reference_statistics_is_refused_by_name():
    with pytest.raises(ValueError, match=r"metrics=\['fid', 'is'\]: \['is'\] need no reference statistics; "
                                         "allowed: any of fid, kid, pr"):
        reference(compose(["data=digits", "metrics=[fid,is]"], "reference"))


def test_a_cache_that_cannot_take_the_entry_fails_before_any_image(tmp_path, monkeypatch):
    """A cache whose reference folder cannot be written (here: a file stands in its place) is refused by name
    before the extractor is built or a reference image read, not after minutes of Inception features. (A cache that
    cannot take the converted Inception weights fails earlier still, naming the file.)"""
    from lightning_diff.evaluation.metrics import compute

    (tmp_path / "reference").write_text("not a folder")
    monkeypatch.setattr(compute.Extractors, "build", lambda *a, **k: pytest.fail("built the extractor"))
    cfg = compose(["data=digits", "metrics.reference_num_images=6", f"metrics.cache_dir={tmp_path}",
                   "progress=false"], "reference")
    with pytest.raises(OSError, match=r"metrics.cache_dir=.* \(reference statistics digits-train.*\): cannot "
                                      r"write to .*reference"):
        reference(cfg)
