"""Execute the notebooks end to end (short settings) and check their outputs."""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


def _use_this_interpreter_as_kernel(tmp_path, monkeypatch):
    """Make the kernel "python3" run ``sys.executable``.

    ipykernel installs its "python3" kernelspec under ``sys.prefix/share/jupyter/kernels`` and jupyter_client
    swaps a bare ``python`` in its argv for ``sys.executable``, so in the project venv the right kernel is found
    anyway. But a "python3" spec earlier on the Jupyter path (``JUPYTER_PATH``, or the user's data dir when the
    environment is not preferred) would start another interpreter, without this package. A spec in a temporary
    folder put first on ``JUPYTER_PATH`` rules that out and writes nothing outside ``tmp_path``.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def _outputs(nb, output_type=None):
    for cell in nb.cells:
        if cell.cell_type == "code":
            for output in cell.get("outputs", []):
                if output_type is None or output["output_type"] == output_type:
                    yield output


def execute(name, tmp_path, monkeypatch):
    """Run ``notebooks/<name>`` in a fresh kernel, side files under ``tmp_path``; return (images, stdout)."""
    _use_this_interpreter_as_kernel(tmp_path, monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile.mkdtemp() log folders land here
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert not list(_outputs(nb)), "commit the notebook with its outputs cleared"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = list(_outputs(nb, "error"))
    assert not errors, [f"{e['ename']}: {e['evalue']}" for e in errors]
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    printed = "".join(o["text"] for o in _outputs(nb, "stream") if o["name"] == "stdout")
    return images, printed


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_EPOCHS", "1")  # runs every cell; learning is the default run's test
    images, printed = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert len(images) >= 2, f"expected the loss and overlay figures, found {len(images)} image(s)"
    assert re.search(r"^liver\s+\d\.\d{3}\s+\d+\.\d", printed, re.MULTILINE), printed


def test_redundancy_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("REDUNDANCY_EPOCHS", "1")
    images, printed = execute("redundancy.ipynb", tmp_path, monkeypatch)
    assert len(images) >= 3, f"expected 2 heat-map figures and the bar chart, found {len(images)} image(s)"
    assert "1 epoch(s) per run" in printed
    for block in ("down1", "down4", "up1", "up4"):
        assert re.search(rf"^{block}\s+0\.\d{{3}}\s+0\.\d{{3}}\s+[+-]\d\.\d{{3}}$", printed, re.MULTILINE), printed
