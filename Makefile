# mi_jax developer entry points. Each target makes its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: venv test test-slow test-fallback ci chromium demo demo-model docs clean

# Model-level test files that the fallback pass (XLA's convolutions, no native kernels) runs again.
FALLBACK_TESTS ?= tests/test_vae.py tests/test_vae_regime.py tests/test_vae_train.py tests/test_vae_grid.py tests/test_prepare.py \
                  tests/test_generate.py tests/test_export.py tests/test_demo.py

$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# Install (CPU) and run the test suite but its `slow` end-to-end checks (multi-process runs: `make
# test-slow`). The app's browser tests (tests/test_app.py) drive Debian's chromium: installed here when
# missing and this is root on Debian (never a downloaded browser); otherwise they say how to install it
# (and fail under CI=true).
test: venv chromium
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The slow end-to-end checks: real multi-process training and generation, kill-and-resume.
test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The model-level tests again with the native CPU convolutions off (a machine without a C++ compiler).
test-fallback: venv
	MI_JAX_CPU_KERNELS=0 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) $(FALLBACK_TESTS)

# What CI runs (.ci/run): all three.
ci: test test-slow test-fallback

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "chromium not found; installing Debian's for the browser tests: apt-get install -y chromium"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	      || echo "could not install chromium; the browser tests will say how"; \
	  else \
	    echo "chromium not found and not installable here (needs root and apt-get): the browser tests will say how"; \
	  fi; }

# The bundled demo model talks for a minute: out/demo.mp4 (voice muxed in) and out/lip_sync.png.
demo: venv
	$(VENV)/bin/mi-jax demo --seconds 60 --out out

# Rebuild demo/ (VAE + stage 1 + stage 2 on the synthetic world, seeded) with the project's commands.
demo-model: venv
	$(VENV)/bin/mi-jax demo-model --out demo/model --work runs/demo

# The docs site (docs/, mkdocs.yml) into build/docs, warnings as errors (a broken link fails).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .cache .pytest_cache
