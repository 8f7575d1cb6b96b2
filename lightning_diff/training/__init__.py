"""Training a ``Denoiser`` with Lightning: ``DiffusionModule`` (``module``), building a run's objects from its config
(``builders``), learning-rate schedules (``optim``), and the run's guards: a resume continues only its own experiment
(``resume_check``), one run per folder (``run_lock``)."""
