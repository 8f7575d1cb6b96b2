"""lightning_diff: one EDM-preconditioned ``Denoiser`` and the rooms around it (docs/architecture.md)."""

from . import aliases

aliases.install()  # the module names of the flat layout, deprecated (lightning_diff.aliases)
