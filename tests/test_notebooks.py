"""The example notebooks run top to bottom (nbclient, a real kernel) on the tiny config."""

import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MI_JAX_ROOT", ROOT)
    monkeypatch.setenv("MI_JAX_OUT", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(os.path.join(ROOT, "examples", name), as_version=4)
    # the kernel must be this interpreter (the venv's python), found first on PATH
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert os.path.getsize(tmp_path / "quickstart.mp4") > 0
