"""The evaluation library behind ``lightning-diff evaluate`` and the metric callbacks (no CLI code here).

- ``generate``: samples of a module in batches, one seed per sample.
- ``sample_quality``: FID/IS/KID/precision-recall of its samples against a data split.
- ``split_bits_per_dim``, ``split_vlb``: probability-flow ODE bits/dim and the discrete variational bound
  on a data split.
- ``write_record``, ``summary_line``: the JSON result record beside the checkpoint and its one-line summary.

Under ``torch.distributed`` every rank calls ``sample_quality``, ``split_bits_per_dim`` and ``split_vlb``
(each handles its shard of seeds or images; statistics are all-reduced inside).
"""

from .generate import generate
from .records import METRICS, selected_metrics, summary_line, write_record
from .sample_quality import METRIC_OPTIONS, SAMPLE_METRICS, default_inception_weights, sample_quality
from .split_likelihood import LIKELIHOOD_METRICS, require_discrete, split_bits_per_dim, split_vlb
from .splits import reference_tag, split_batch, split_view

__all__ = ["generate", "sample_quality", "split_bits_per_dim", "split_vlb", "require_discrete", "write_record",
           "summary_line", "selected_metrics", "default_inception_weights", "split_view", "split_batch",
           "reference_tag", "METRICS", "SAMPLE_METRICS", "METRIC_OPTIONS", "LIKELIHOOD_METRICS"]
