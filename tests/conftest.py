import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Caches (the pre-flight record, nnU-Net's preprocessed cases) never go to the user's ~/.cache or into the package:
# one folder for the session (subprocesses inherit it), a fresh one per test (below).
_SESSION_CACHE = tempfile.mkdtemp(prefix="selfreg-test-cache-")
atexit.register(shutil.rmtree, _SESSION_CACHE, True)
os.environ["XDG_CACHE_HOME"] = _SESSION_CACHE


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own XDG_CACHE_HOME: no test sees another's pre-flight record or preprocessed cases."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def write_synapse_layout(root, n_train_cases=2, slices_per_case=3, n_test=1, size=(24, 20), depth=4, num_classes=9,
                         seed=0):
    """Write a tiny dataset in the Synapse/TransUNet layout (npz slices, h5 volumes, list files)."""
    import h5py

    rng = np.random.default_rng(seed)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    (root / "lists").mkdir()
    names = []
    for c in range(n_train_cases):
        for s in range(slices_per_case):
            name = f"case{c:04d}_slice{s:03d}"
            label = np.zeros(size, dtype=np.uint8)
            label[4:12, 3:9] = 1 + (c + s) % (num_classes - 1)
            image = (rng.random(size) * 0.2 + 0.4 * (label > 0)).astype(np.float32)
            np.savez(root / "train_npz" / f"{name}.npz", image=image, label=label)
            names.append(name)
    (root / "lists" / "train.txt").write_text("\n".join(names) + "\n")
    cases = []
    for t in range(n_test):
        case = f"case{100 + t:04d}"
        label = np.zeros((depth, *size), dtype=np.uint8)
        label[1:3, 4:12, 3:9] = 5
        image = (rng.random((depth, *size)) * 0.2 + 0.4 * (label > 0)).astype(np.float32)
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"], f["label"] = image, label.astype(np.float32)
            f.attrs["spacing"] = [2.0, 1.0, 1.0]
        cases.append(case)
    (root / "lists" / "test_vol.txt").write_text("\n".join(cases) + "\n")
    return root


@pytest.fixture
def synapse_dir(tmp_path):
    return write_synapse_layout(tmp_path / "synapse")


# The tiny command-line run of tiny_run: UNet width 4 at 32 px, 1 epoch on the bundled sample, CSV logs.
TINY_RUN = ["--gpus", "0", "--width", "4", "--image-size", "32", "--max-epochs", "1", "--batch-size", "16",
            "--redundancy", "null", "--wandb", "disabled"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny ``experiments.run`` run, made once per session for the tests that only read a run folder or need
    a trained checkpoint: ``(run folder, what the run printed)``. Tests must not write into the folder."""
    import contextlib
    import io

    from experiments import run

    out = tmp_path_factory.mktemp("tiny_run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = run.main([*TINY_RUN, "--output-dir", str(out), "--run-name", "tiny"])
    assert status == 0, printed.getvalue()[-3000:]
    return out / "tiny", printed.getvalue()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` where CUDA is not available (CI never has a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def capture(net, x):
    """Run ``net`` on ``x`` with its own ``tap_spec`` tapped; returns ``(features, logits)``."""
    from lightning_selfreg import FeatureTaps

    spec = net.tap_spec
    with FeatureTaps(net, spec.paths, spec.nhwc) as taps:
        with taps.capture():
            logits = net(x)
        return taps.pop(), logits
