"""A short training run prints no warning from lightning_diff's own calls and none of the library messages a
user cannot act on (lightning_diff.known_warnings lists those it silences, each with its reason)."""

import re
import warnings
from pathlib import Path

import lightning_diff
from lightning_diff.cli.train import finish_logging, train
from lightning_diff.config import compose
from lightning_diff.known_warnings import silence_unactionable_warnings

PACKAGE = str(Path(lightning_diff.__file__).parent)

# toy2d, 64 points in batches of 16: 4 batches an epoch, fewer than log_every_n_steps=20 (the logging-interval
# warning's condition); W&B offline, EMA, checkpoints and the sample grid as in the demo.
TINY = ["data=toy2d", "data.num_samples=64", "data.num_val_samples=16", "data.batch_size=16", "network=mlp",
        "network.hidden=16", "network.depth=1", "network.emb_channels=8", "logger=wandb", "trainer.max_steps=6",
        "trainer.log_every_n_steps=20", "trainer.check_val_every_n_epoch=1", "callbacks.sample_grid.num_samples=4"]

# What each silenced message looks like, to show that none comes through.
UNACTIONABLE = [r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"smaller than the logging interval",
                r"anonymous setting has no effect", r"Tip: For seamless cloud logging"]


def test_short_run_prints_no_warning_of_ours_and_no_unactionable_one(tmp_path, capfd, caplog, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # conftest silences W&B; the user's terminal does not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_unactionable_warnings()
        try:
            train(compose([*TINY, f"paths.output_dir={tmp_path}"]))
        finally:
            finish_logging()
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if w.filename.startswith(PACKAGE)]
    assert not ours, ours
    printed = "\n".join([capfd.readouterr().err, caplog.text, *(str(w.message) for w in caught)])
    assert [pattern for pattern in UNACTIONABLE if re.search(pattern, printed)] == []
