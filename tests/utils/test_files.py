"""utils/files.py: a folder written with atomic_folder appears whole; the folder it replaces stays whole till then."""

import os

import pytest

from lightning_selfreg.utils import files
from lightning_selfreg.utils.files import WriteError, atomic_folder


def _write(content):
    def write(tmp):
        (tmp / "data.txt").write_text(content)

    return write


def test_atomic_folder_replaces_a_folder_and_keeps_it_when_the_write_or_the_rename_fails(tmp_path, monkeypatch):
    case = tmp_path / "case_000"
    atomic_folder(case, _write("old"))
    assert (case / "data.txt").read_text() == "old"

    def fail(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="no space left"):
        atomic_folder(case, fail)
    assert (case / "data.txt").read_text() == "old"
    replace = os.replace

    def rename_in_fails(src, dst):
        if str(src).endswith(f".tmp{os.getpid()}.case_000"):
            raise OSError(5, "Input/output error")
        return replace(src, dst)

    monkeypatch.setattr(files.os, "replace", rename_in_fails)
    with pytest.raises(WriteError):
        atomic_folder(case, _write("new"))
    assert (case / "data.txt").read_text() == "old"  # put back, whole
    monkeypatch.setattr(files.os, "replace", replace)
    atomic_folder(case, _write("new"))
    assert (case / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_000"]  # no temporary or old folder left
