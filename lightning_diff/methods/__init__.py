"""Methods built on a trained model, one module each: noise-conditional classifiers for classifier guidance
(``classifier``), progressive distillation (``distillation``), reflow couplings (``reflow``). Their commands are in
``lightning_diff.cli``, their objectives in ``lightning_diff.objectives``."""
