"""The test session leaves the user's files alone and hides none of the project's own deprecations: caches go to a
session temporary folder (tests/conftest.py), not ``~/.cache/lightning_diff``, and pyproject's filterwarnings
ignores third-party deprecation warnings only."""

import warnings
from pathlib import Path

from lightning_diff.checkpoint_io import default_cache_dir
from lightning_diff.pretrained.remote import cache_root


def test_caches_are_outside_the_home_folder():
    home_cache = (Path.home() / ".cache" / "lightning_diff").resolve()
    for folder in (default_cache_dir(), cache_root()):
        assert not folder.resolve().is_relative_to(home_cache), folder


def _action(module: str) -> str:
    """The action the session's filters take on a DeprecationWarning raised from ``module`` (the first matching
    filter, as ``warnings.warn_explicit`` picks it; "default" when none matches)."""
    for action, message, category, mod, lineno in warnings.filters:
        if issubclass(DeprecationWarning, category) and (mod is None or mod.match(module)) and lineno in (0, 1) \
                and (message is None or message.match("old API")):
            return action
    return "default"


def test_the_projects_deprecations_show_and_third_party_ones_do_not():
    assert _action("lightning_diff.cli.train") != "ignore"
    assert _action("lightning_diff.sampling.samplers") != "ignore"
    assert _action("torch.utils.data") == "ignore"
