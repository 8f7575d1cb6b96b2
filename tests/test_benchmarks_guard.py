"""``make bench`` fails loudly when a ratio falls more than 10% below its committed value
(``benchmarks/committed.json``), and every committed value names a row that ``run_all.py`` prints."""

import json

from .helpers import ROOT, load_script

BENCH = ROOT / "benchmarks"
run_all = load_script(BENCH / "run_all.py", "run_all")
COMMITTED = json.loads((BENCH / "committed.json").read_text())


def test_every_committed_ratio_is_a_row_of_the_table():
    rows = {what for rows in run_all.ROWS.values() for what, _, _ in rows}
    assert set(COMMITTED) - {"_about"} <= rows


def test_a_ratio_more_than_ten_percent_worse_is_named_and_one_within_ten_percent_is_not():
    fid, cfg = "FID throughput vs torch-fidelity calculate_metrics", "CFG run / two unguided runs (time)"
    committed = {fid: 1.40, cfg: 1.00}
    ok = [("metrics.py", fid, "1.27", ">= 1.5"), ("s.py", cfg, "1.11", "<= 1.05")]  # 1.27 > 0.9 x 1.40; 1.11 < 1/0.9
    bad = [("metrics.py", fid, "1.25", ">= 1.5"), ("s.py", cfg, "1.12", "<= 1.05"), ("x.py", "other", "0.1", ">= 1")]
    assert run_all.regressions(ok, committed) == []
    assert [line.split(":")[0] for line in run_all.regressions(bad, committed)] == [fid, cfg]
    assert run_all.regressions([("metrics.py", fid, "not run", ">= 1.5")], committed) == []


def test_the_56m_network_of_the_ema_row_is_the_presets(monkeypatch):
    """``--quick`` leaves the DDPM++ row out, so only a full ``make bench`` reached this path: it read the config
    from the checkout's old top-level configs/ folder, gone since the configs moved into the package."""
    monkeypatch.syspath_prepend(str(BENCH))  # training.py imports its sibling clock.py
    network = load_script(BENCH / "training.py", "bench_training").ddpmpp_cifar10()
    # NVlabs/edm SongUNet ddpmpp, label_dim 0 (EDM Table 7: 55.73M)
    assert sum(p.numel() for p in network.parameters()) == 55_733_891
