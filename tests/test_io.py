"""Atomic outputs get the modes a plain open/mkdir would give under the umask (not mkstemp's
0600 / mkdtemp's 0700), so exports and run outputs are readable as users expect."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from elm.utils.io import BackgroundSaver, atomic_torch_save, atomic_write_json, replace_dir


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


def test_background_saver_writes_the_state_as_it_was_when_asked(tmp_path: Path) -> None:
    weight = torch.arange(6.0)
    state = {"w": weight, "history": [{"epoch": 1}], "step": 3}
    with BackgroundSaver() as saver:
        saver.save(state, tmp_path / "a.pt")
        weight.add_(100)  # the next training step changes the live tensors at once
        state["history"].append({"epoch": 2})
        saver.save(state, tmp_path / "b.pt")  # waits for a.pt, then writes b.pt
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    assert a["w"].tolist() == list(range(6)) and a["history"] == [{"epoch": 1}] and a["step"] == 3
    assert b["w"].tolist() == [100.0 + i for i in range(6)] and len(b["history"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temp file left


def test_background_saver_hands_a_failed_write_to_the_caller(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    saver = BackgroundSaver()
    saver.save({"w": torch.zeros(2)}, blocker / "state.pt")  # its folder cannot be made
    with pytest.raises(OSError):
        saver.wait()
    saver.wait()  # reported once; the saver is usable again
    saver.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    saver.wait()
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]
