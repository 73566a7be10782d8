"""Atomic outputs: a file or folder is either complete or absent (temp + rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

# the run dir's file names every stage shares
DONE_FILE = "DONE"  # the marker a stage writes last: its outputs are complete
SEARCH_STATE_FILE = "search_state.pt"  # the search's resumable state (supernet, optimiser, history)
RETRAIN_STATE_FILE = "retrain_state.pt"


def usual_permissions(path: str | Path) -> Path:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (0600/0700) the mode a plain
    ``open``/``mkdir`` would have had under the process umask (usually 0644/0755), so that exports
    and run outputs are readable by others as users expect."""
    path = Path(path)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read it
    back would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_file(path: str | Path, write) -> Path:
    """``write(tmp)`` a temp file beside ``path``, then rename it over ``path`` (readers see the old
    file or the new one, never half of one); a failed write leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:  # a failed write (full disk, interrupt) leaves no orphan temp file
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic_file(path, lambda tmp: torch.save(obj, tmp))


class BackgroundSaver:
    """Writes :func:`atomic_torch_save` checkpoints on a thread, so training goes on while the file
    is written (a search's epoch-end state is ~360 MB).

    ``save`` snapshots the state on the caller's thread first (every tensor copied to the CPU: the
    next steps change the live ones), waits for the previous write, then starts this one. ``wait``
    blocks until the write under way has landed and re-raises its error, if any. Used as a context
    manager, leaving waits, so a run never ends with a write under way (a failing run still keeps
    its error, not the writer's)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, obj: Any, path: str | Path) -> None:
        from torch.utils._pytree import tree_map

        snapshot = tree_map(lambda x: x.detach().to("cpu", copy=True) if torch.is_tensor(x) else x, obj)
        self.wait()

        def write() -> None:
            try:
                atomic_torch_save(snapshot, path)
            except BaseException as err:  # noqa: BLE001 - handed to the caller by wait()
                self._error = err

        self._thread = threading.Thread(target=write, name="elm-checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def __enter__(self) -> BackgroundSaver:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.wait()
        else:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                self.wait()


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path):
    """Yield a temp folder beside ``final_dir``; when the block ends without error it replaces
    ``final_dir`` (:func:`replace_dir`), on any error it is removed: the folder is complete or absent."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=final_dir.parent))
    try:
        yield tmp
        replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install_dir(target: Path, write, marker: str) -> Path:
    """A shared cache folder built by ``write(tmp)`` in a temp sibling, then renamed to ``target``
    (atomic). When another process installed it first (the rename fails and ``target/marker``
    exists), theirs is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        usual_permissions(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Move a finished temp folder into place, replacing an older one."""
    final_dir = Path(final_dir)
    usual_permissions(tmp_dir)  # before anything is removed: a failing chmod keeps the old folder
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    return final_dir


def load_checkpoint(path: str | Path, device: Any, what: str, key: str) -> dict[str, Any]:
    """A training state written by :func:`atomic_torch_save`, or a one-line ValueError when it is
    unreadable (truncated, not a checkpoint) or is not a ``what`` (has no ``key``)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ValueError(f"{what} {path} is corrupt or unreadable ({type(err).__name__}); "
                         "delete it to start over") from None  # fmt: skip
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"{path} is not an elm {what}")
    return state


def check_weight_files(model_dir: str | Path) -> None:
    """Every ``*.safetensors`` file of a model dir opens (header and size agree): a truncated or
    corrupt weights file is one ValueError naming it, before any model is built."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError and OSError mean the same here
            raise ValueError(f"weights file {file} is truncated or corrupt ({str(err).splitlines()[0]}); "
                             "export or download it again") from None  # fmt: skip
