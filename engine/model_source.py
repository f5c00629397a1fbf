"""Where the model comes from: ``--model`` resolved to a local folder with config.json,
or to a GGUF file (a ``.gguf`` path, or a folder without config.json holding one).

A local folder is used as it is. Anything else is a model id (``Org/Name``) or an
alias (``qwq-32b``): it is looked up in the cache (Hugging Face layout,
``models--Org--Name/snapshots/<rev>/``) and, with ``--auto_download``, downloaded
through huggingface_hub or modelscope. Every failure is a ``ModelSourceError``
with a message a user can act on. No torch here.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from engine.api import EngineError

log = logging.getLogger(__name__)

# Short names for the models these deployments use; values are Hugging Face ids
# (Qwen ids are the same on ModelScope).
ALIASES: dict[str, str] = {
    "qwq-32b": "Qwen/QwQ-32B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b-instruct": "Qwen/Qwen2.5-14B-Instruct",
    "qwen2.5-32b-instruct": "Qwen/Qwen2.5-32B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
}
PROVIDERS = ("huggingface", "modelscope")
# What the engine reads; other weight formats (.bin, .pth, .gguf) are not downloaded.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


class ModelSourceError(EngineError):
    """The model named by --model cannot be found or fetched."""


def resolve_model(
    model: str,
    *,
    provider: str = "huggingface",
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    auto_download: bool = False,
    timeout: float = 10.0,
) -> Path:
    """The local folder (holding config.json) of ``model``, or its GGUF file: a path, a model
    id or an alias."""
    if provider not in PROVIDERS:
        raise ModelSourceError(f"unknown model provider {provider!r}: use {' or '.join(PROVIDERS)}")
    path = Path(model).expanduser()
    if path.exists():
        gguf_file = find_gguf_file(path)
        if gguf_file is not None:
            return gguf_file
        return _checked_folder(path, f"model folder {model}")
    if _looks_like_path(model):
        raise ModelSourceError(f"model folder {model} does not exist")
    repo_id = ALIASES.get(model.lower(), model)
    if not _REPO_ID.match(repo_id):
        raise ModelSourceError(
            f"--model {model!r} is neither a folder nor a model id (Org/Name) nor an alias; "
            f"aliases: {', '.join(sorted(ALIASES))}"
        )
    if repo_id != model:
        log.info("model alias %s -> %s", model, repo_id)
    if provider == "modelscope":
        folder = _modelscope(repo_id, cache_dir, revision, auto_download)
    else:
        folder = _huggingface(repo_id, cache_dir, revision, auto_download, timeout)
    return _checked_folder(folder, f"the snapshot of {repo_id} ({folder})")


def find_gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the one ``*.gguf`` in a folder
    without config.json; None for anything else. Several files, or a split GGUF, is an error."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"--model {path} is a file but not a .gguf file; pass a model folder or a .gguf file")
        files = [path]
    elif path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if not files:
            return None
        if len(files) > 1:
            names = ", ".join(f.name for f in files[:6])
            raise ModelSourceError(
                f"model folder {path} holds {len(files)} GGUF files ({names}); pass the one to serve"
            )
    else:
        return None
    if _SPLIT_GGUF.search(files[0].name):
        raise ModelSourceError(
            f"{files[0]} is one part of a split GGUF; merge the parts first "
            "(llama-gguf-split --merge FIRST-PART OUT.gguf) and pass the merged file"
        )
    return files[0].resolve()


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model


def _checked_folder(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise ModelSourceError(f"{what} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{what} has no config.json: not a Hugging Face model folder")
    return folder.resolve()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def _not_cached(repo_id: str, cache_dir: str | os.PathLike | None, revision: str | None) -> str:
    where = cache_dir or "the Hugging Face cache"
    rev = f" (revision {revision})" if revision else ""
    return (f"model {repo_id}{rev} is not in {where}; pass --auto_download to download it, "
            "or --model /path/to/model-folder for a model on disk")


def _huggingface(repo_id: str, cache_dir: str | os.PathLike | None, revision: str | None,
                 auto_download: bool, timeout: float) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    common = {"revision": revision, "cache_dir": cache_dir}
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, **common))
        if (folder / "config.json").is_file() or not auto_download:
            log.info("model %s found in the cache: %s", repo_id, folder)
            return folder
    except LocalEntryNotFoundError:
        if not auto_download:
            raise ModelSourceError(_not_cached(repo_id, cache_dir, revision)) from None
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at huggingface_hub import
    log.info("downloading %s from %s (this can take a long time)", repo_id,
             endpoint or "huggingface.co")
    try:
        return Path(snapshot_download(repo_id, endpoint=endpoint, etag_timeout=timeout,
                                      allow_patterns=DOWNLOAD_PATTERNS, **common))
    except GatedRepoError:
        reason = "is gated: accept its licence on the hub and set HF_TOKEN"
    except RevisionNotFoundError:
        reason = f"has no revision {revision!r}"
    except RepositoryNotFoundError:
        reason = "was not found on the hub (a private model needs HF_TOKEN)"
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        cause = exc.__cause__ or exc
        raise ModelSourceError(
            f"cannot download {repo_id}: the hub ({endpoint or 'huggingface.co'}) cannot be "
            f"reached ({_first_line(cause)}); on a machine "
            "without internet pass --model /path/to/model-folder, or set HF_ENDPOINT to a "
            "reachable mirror"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        reason = f"failed to download: {_first_line(exc)}"
    raise ModelSourceError(f"model {repo_id} {reason}")


def _modelscope(repo_id: str, cache_dir: str | os.PathLike | None, revision: str | None,
                auto_download: bool) -> Path:
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ModelSourceError(
            "--model_provider modelscope needs the modelscope package: pip install modelscope"
        ) from None
    kwargs: dict = {"cache_dir": str(cache_dir) if cache_dir else None}
    if revision:
        kwargs["revision"] = revision
    try:
        if not auto_download:
            return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        log.info("downloading %s from ModelScope (this can take a long time)", repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, **kwargs))
    except Exception as exc:  # modelscope raises plain ValueError/requests errors
        if not auto_download:
            raise ModelSourceError(_not_cached(repo_id, cache_dir, revision)) from None
        raise ModelSourceError(
            f"cannot download {repo_id} from ModelScope ({_first_line(exc)}); on a machine "
            "without internet pass --model /path/to/model-folder"
        ) from None
