# lightning_diff: `make demo` trains EDM on digits (experiment=edm_digits_fast) and writes a sample grid; `make test` runs the fast suite.
PY        := .venv/bin/python
STAMP     := .venv/.installed
PYTEST    := $(PY) -m pytest

.PHONY: install demo test test-slow lint benchmarks bench clean browser

install: $(STAMP)

# Re-install only when the dependency list changes; torch/torchvision come from the local wheel store.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# k-diffusion: the oracle of tests/test_samplers_known_set.py; its sampling code only (its training
	@# requirements pin numpy < 2), so without its dependencies (torchsde, torchdiffeq are in the dev extra).
	$(PY) -m pip install --quiet --no-deps k-diffusion==0.1.1.post1
	@# Fashion-MNIST offline (Debian package); best effort: its tests skip without it.
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true; }
	@# The demo data's reference statistics (Inception features of the 1,617 training digits, ~2 minutes on 2
	@# cores), cached once so that the README's first evaluate does not compute them; best effort (evaluate
	@# computes what is missing, with progress lines).
	-$(PY) -m lightning_diff reference data=digits progress=false
	@touch $(STAMP)

demo: install
	$(PY) -m lightning_diff train experiment=edm_digits_fast
	$(PY) experiments/edm_digits/check_digits.py

test: install
	$(PYTEST) -m "not slow" -q

# Headless Chromium (Debian package) for the leaderboard page test; best effort: the test skips without it.
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || true; }

test-slow: install browser
	$(PYTEST) -m slow -q

# Performance ratios against the reference tools, one table; benchmarks/README.md records a run.
bench: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/run_all.py

lint: install
	$(PY) -m ruff check lightning_diff tests benchmarks experiments

clean:
	rm -rf outputs multirun wandb .pytest_cache
