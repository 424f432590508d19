# mi_jax developer entry points. Each target makes its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: venv test demo demo-model clean

$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# Install (CPU) and run the whole test suite.
test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The bundled demo model talks for a minute: out/demo.mp4 (voice muxed in) and out/lip_sync.png.
demo: venv
	$(VENV)/bin/mi-jax demo --seconds 60 --out out

# Rebuild demo/ (VAE + stage 1 + stage 2 on the synthetic world, seeded) with the project's commands.
demo-model: venv
	$(VENV)/bin/mi-jax demo-model --out demo/model --work runs/demo

clean:
	rm -rf $(VENV) .cache .pytest_cache
