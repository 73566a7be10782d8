"""Atomic outputs get the modes a plain open/mkdir would give under the umask (not mkstemp's
0600 / mkdtemp's 0700), so exports and run outputs are readable as users expect."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from elm.utils.io import atomic_torch_save, atomic_write_json, replace_dir


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        files = [atomic_write_json(tmp_path / "a.json", {"x": 1}), atomic_torch_save({"x": 1}, tmp_path / "s.pt")]
        tmp = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as every export's temp folder
        (tmp / "weights").write_text("w")
        export = replace_dir(tmp, tmp_path / "model")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(f.stat().st_mode) for f in files] == [file_mode, file_mode]
    assert stat.S_IMODE(export.stat().st_mode) == dir_mode


def test_wandb_mode_from_the_environment_wins(tmp_path: Path, monkeypatch) -> None:
    from elm.utils.logging import RunLogger, read_metrics

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = RunLogger(tmp_path, mode="offline")  # the config asks for offline; the environment says no
    logger.log({"step": 1, "loss": 0.5})
    logger.finish()
    assert logger.run is None and not (tmp_path / "wandb").exists()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes' is unknown; valid: online, offline, disabled"):
        RunLogger(tmp_path)
