"""``GenerativeMetrics`` and ``BitsPerDim`` in a short fit: they run after a validation epoch (EMA weights
swapped in) and at fit end (EMA copied in), log ``metrics/fid`` and ``metrics/bpd`` and keep the protocol."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from pytorch_lightning.loggers import WandbLogger

from lightning_diff.callbacks import EMA, BitsPerDim, GenerativeMetrics
from lightning_diff.cli.train import optimized_value, train

from .helpers import compose_config


def test_callbacks_log_their_metrics_in_a_short_fit(tmp_path):
    """A fixed EMA decay of 0.9999 keeps the average near the initial weights, far from the trained ones: the
    FID after the validation epoch (average swapped in) equals the fit-end FID (average copied in) only when
    both ran on the average."""
    cfg = compose_config("train", [
        "logger=csv", "callbacks=[default,generative_metrics,bits_per_dim]", "callbacks/ema=fixed",
        "callbacks.progress=null", "++trainer.enable_progress_bar=false", "callbacks.sample_grid=null",
        "data=digits", "network.model_channels=8", "data.batch_size=16", "trainer.max_epochs=1",
        "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1",
        "callbacks.generative_metrics.every_n_epochs=1", "callbacks.generative_metrics.num_samples=4",
        "callbacks.generative_metrics.sampler.steps=2", "callbacks.generative_metrics.reference_num_images=8",
        "callbacks.generative_metrics.batch_size=8", f"callbacks.generative_metrics.cache_dir={tmp_path / 'cache'}",
        "++callbacks.generative_metrics.options.fid.method=eigvals",
        "callbacks.bits_per_dim.num_images=2", "callbacks.bits_per_dim.batch_size=2",
        "callbacks.bits_per_dim.rtol=1e-2", "callbacks.bits_per_dim.atol=1e-2"], tmp_path)
    result = train(cfg)
    rows = list(csv.DictReader(open(next(Path(tmp_path, "csv").rglob("metrics.csv")))))
    fids = [float(r["metrics/fid"]) for r in rows if r.get("metrics/fid")]
    bpds = [float(r["metrics/bpd"]) for r in rows if r.get("metrics/bpd")]
    assert len(fids) == 2 and len(bpds) == 1  # FID after the validation epoch and at fit end; bpd at fit end
    assert fids[0] == pytest.approx(fids[1], rel=1e-6)  # module.log stores float32
    assert result["metrics/fid"] == pytest.approx(fids[0], rel=1e-6)  # logged through module.log: monitorable
    assert all(math.isfinite(v) and v > 0 for v in fids + bpds)
    # what a sweeper optimises is read back from the fit-end records on disk (the numbers a leaderboard ranks)
    records = {key: json.loads(Path(path).read_text()) for key, path in result.items() if key.startswith("record/")}
    assert set(records) == {"record/generative_metrics", "record/bits_per_dim"}
    assert optimized_value(result, "fid") == records["record/generative_metrics"]["metrics"]["fid"]
    assert optimized_value(result, "fid") == pytest.approx(fids[1], rel=1e-6)
    assert optimized_value(result, "bpd") == pytest.approx(bpds[0], rel=1e-6)
    assert optimized_value(result, "train/loss") == result["train/loss"]
    with pytest.raises(ValueError, match="optimized_metric='kid_mean': no evaluation record of this run holds it"):
        optimized_value(result, "kid_mean")


class _SummaryOnlyWandb(WandbLogger):
    """A WandbLogger whose run is a stand-in holding ``summary`` and the logged rows (no W&B process)."""

    def __init__(self):
        super().__init__(offline=True)
        self.run = SimpleNamespace(summary={}, rows=[])
        self.run.log = lambda row, **kwargs: self.run.rows.append(row)

    @property
    def experiment(self):
        return self.run


@pytest.mark.parametrize("ema_first", [True, False])
def test_protocol_goes_to_the_wandb_summary_with_the_weights_used(ema_first, tmp_path):
    callback = GenerativeMetrics()
    callback.measure = lambda trainer, module, weights: ({"fid": 1.5}, {"num_images": 4, "weights": weights})
    logger = _SummaryOnlyWandb()
    callbacks = [EMA(), callback] if ema_first else [callback, EMA()]
    trainer = SimpleNamespace(callbacks=callbacks, loggers=[logger], is_global_zero=True, current_epoch=0,
                              global_step=3, checkpoint_callback=None, default_root_dir=str(tmp_path))
    callback.on_train_end(trainer, None)
    weights = "ema" if ema_first else "raw"  # EMA copies the average in at fit end only if it runs first
    summary = logger.run.summary
    assert {k: summary[k] for k in ("metrics/generative_metrics/protocol", "metrics/fid")} == {
        "metrics/generative_metrics/protocol": {"num_images": 4, "weights": weights}, "metrics/fid": 1.5}
    record = summary["records/generative_metrics"]  # the record, also on disk (lightning_diff.evaluation.records)
    assert record["metrics"] == {"fid": 1.5} and record["protocol"]["weights"] == weights
    assert (tmp_path / "eval-train-generative_metrics-step3.json").is_file()
    assert logger.run.rows[-1]["metrics/fid"] == 1.5
    assert callback.history[-1]["weights"] == weights and callback.history[-1]["step"] == 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="allowed: any of"):
        GenerativeMetrics(metrics=["bpd"])
    with pytest.raises(ValueError, match="every_n_epochs"):
        BitsPerDim(every_n_epochs=-1)
