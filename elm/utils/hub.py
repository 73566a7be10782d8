"""Publishing a saved model to the Hugging Face Hub (``hub.repo_id=<user>/<name>``).

Retrain, fine-tuning and task distillation take the same ``hub`` settings::

    hub:
      repo_id: null     # null = no push
      private: true     # only for a repo the push creates
      revision: null    # branch (null = main)

:func:`check_hub_settings` runs with the other settings checks, before anything trains: a valid repo
id, not in offline mode (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``), a token
(``HF_TOKEN`` or ``hf auth login``). :func:`reach_hub` then asks the hub who the token belongs to
(rank 0, still before training), so a machine without network or with a bad token fails in seconds
rather than after hours. :func:`push_model` runs after the model is saved:
``create_repo(exist_ok=True)`` + ``upload_folder``. [decision] A failed push never removes what
was computed: the error names the saved folder and the ``hf upload`` command that retries it.

``HF_ENDPOINT`` points the client at another hub (the tests use a local stand-in server).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("elm.hub")
_TRUE = {"1", "on", "yes", "true"}


class HubError(RuntimeError):
    """A push that failed after the model was saved; the message says how to retry."""


def _repo_id(hub: Any) -> str | None:
    return None if hub is None else hub.get("repo_id")


def offline() -> bool:
    """The hub client's offline switches, read now (``huggingface_hub.constants`` reads them at import)."""
    return any(
        os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_hub_settings(hub: Any) -> None:
    """``hub.*`` before any work: one ``ValueError`` line for a bad id, offline mode or no token."""
    repo_id = _repo_id(hub)
    if repo_id is None:
        return
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or "/" not in repo_id:
        raise ValueError(f"hub.repo_id={repo_id!r} must be '<user or org>/<name>' (or null for no push)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"hub.repo_id={repo_id!r} is not a valid repo id: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(hub.get("private", True), bool):
        raise ValueError(f"hub.private={hub.private!r} must be true or false")
    revision = hub.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"hub.revision={revision!r} must be a branch name or null (main)")
    if offline():
        raise ValueError(f"hub.repo_id={repo_id} needs the network, but offline mode is on "
                         "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); unset it or drop hub.repo_id")  # fmt: skip
    if get_token() is None:
        raise ValueError(f"hub.repo_id={repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login` "
                         "(or drop hub.repo_id)")  # fmt: skip


def reach_hub(hub: Any) -> str | None:
    """Ask the hub who the token belongs to; the user name, or one ``ValueError`` line when unreachable."""
    repo_id = _repo_id(hub)
    if repo_id is None:
        return None
    from huggingface_hub import HfApi

    try:
        user = HfApi().whoami()
    except Exception as err:  # no network, DNS, proxy, 401: all mean no push
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"hub.repo_id={repo_id}: cannot reach the hub ({first}); "
                         "check the network and the token, or drop hub.repo_id") from None  # fmt: skip
    return user.get("name")


def push_model(model_dir: str | Path, hub: Any, message: str) -> dict[str, Any] | None:
    """Upload ``model_dir`` to ``hub.repo_id``; returns ``{"repo_id", "url", "commit", "revision"}``."""
    repo_id = _repo_id(hub)
    if repo_id is None:
        return None
    from huggingface_hub import HfApi

    model_dir, revision = Path(model_dir), hub.get("revision")
    try:
        api = HfApi()
        api.create_repo(repo_id, private=bool(hub.get("private", True)), exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), commit_message=message,
                                 revision=revision)  # fmt: skip
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        retry = f"hf upload {repo_id} {model_dir} ." + (f" --revision {revision}" if revision else "")
        raise HubError(f"push to hub.repo_id={repo_id} failed ({first}); the model is saved in {model_dir}: "
                       f"retry with `{retry}`") from None  # fmt: skip
    log.info("pushed %s to %s", model_dir, info.commit_url)
    return {"repo_id": repo_id, "url": info.commit_url, "commit": info.oid, "revision": revision or "main"}
