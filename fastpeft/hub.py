"""Resolve an adapter location (a local folder or a Hugging Face Hub repo id) to local files.

A ``path_or_repo_id`` is first tried as a local folder. When it is not one, it is treated as a
Hub repo id and resolved with :func:`huggingface_hub.hf_hub_download`, so the Hub cache
(``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1`` and tokens work as they do for Transformers and PEFT.
Every failure is reported as :class:`AdapterNotFoundError` naming what was looked for and where.
"""

from __future__ import annotations

import os

__all__ = ["AdapterNotFoundError", "AdapterFormatError", "resolve_file", "is_local_folder"]


class AdapterNotFoundError(FileNotFoundError, ValueError):
    """An adapter file could not be found locally or on the Hub.

    It is a ``FileNotFoundError``; it is also a ``ValueError`` because PEFT raises ``ValueError``
    in the same situations, so code written against PEFT keeps catching it.
    """


class AdapterFormatError(ValueError):
    """An adapter file exists but cannot be read: invalid JSON, a truncated or corrupt
    safetensors file, or a pickle that holds more than tensors."""


def is_local_folder(path_or_repo_id: str) -> bool:
    """True when ``path_or_repo_id`` names an existing local directory."""
    return os.path.isdir(os.fspath(path_or_repo_id))


def _where(path_or_repo_id: str, subfolder: str | None, revision: str | None) -> str:
    where = f"'{path_or_repo_id}'"
    if subfolder:
        where += f" (subfolder '{subfolder}')"
    if revision:
        where += f" at revision '{revision}'"
    return where


def resolve_file(
    path_or_repo_id: str,
    filename: str,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    required: bool = True,
    local_files_only: bool = False,
) -> str | None:
    """Return the local path of ``filename`` inside an adapter folder or Hub repo.

    Args:
        path_or_repo_id: a local folder, or a Hub repo id such as ``"owner/name"``.
        filename: the file to find, e.g. ``"adapter_config.json"``.
        subfolder: a folder inside ``path_or_repo_id`` that holds the file.
        revision: Hub branch, tag or commit hash (ignored for local folders).
        token: Hub token (``str``) or ``True`` to use the saved one.
        cache_dir: Hub cache folder; default ``huggingface_hub.constants.HF_HUB_CACHE``.
        required: when False, return ``None`` if the folder or repo exists (or may exist) but
            lacks the file, instead of raising. Errors about the repo itself still raise.
        local_files_only: never touch the network, use the Hub cache only.

    Raises:
        AdapterNotFoundError: the local folder lacks the file, the repo id is invalid or does
            not exist, the revision or file is missing, the file is not cached while offline, or
            the Hub cannot be reached. The message names ``filename`` and ``path_or_repo_id``.
    """
    path_or_repo_id = os.fspath(path_or_repo_id)
    if subfolder == "":
        subfolder = None
    where = _where(path_or_repo_id, subfolder, revision)

    if is_local_folder(path_or_repo_id):
        folder = os.path.join(path_or_repo_id, subfolder) if subfolder else path_or_repo_id
        candidate = os.path.join(folder, filename)
        if os.path.isfile(candidate):
            return candidate
        if required:
            raise AdapterNotFoundError(f"No file named '{filename}' in the local folder '{folder}'.")
        return None

    return _hub_download(
        path_or_repo_id, filename, subfolder, revision, token, cache_dir, required, local_files_only, where
    )


def _hub_download(repo_id, filename, subfolder, revision, token, cache_dir, required, local_files_only, where):
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        HTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again now so that setting it
    # later (as tests and notebooks do) still means no network access and no retry wait
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    offline = local_files_only or env_offline or constants.is_offline_mode()
    local_files_only = local_files_only or offline
    try:
        return hf_hub_download(
            repo_id,
            filename,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except HFValidationError as exc:
        raise AdapterNotFoundError(
            f"Cannot find '{filename}': '{repo_id}' is not a local folder and not a valid Hugging Face Hub "
            f"repo id ({exc}). Pass an existing folder or a repo id like 'owner/name'."
        ) from exc
    except GatedRepoError as exc:
        raise AdapterNotFoundError(
            f"Cannot download '{filename}' from {where}: the repo is gated; pass a `token` with access."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise AdapterNotFoundError(
            f"Cannot find '{filename}': no Hugging Face Hub repo {where} (it does not exist, is private, or the "
            "token has no access), and it is not a local folder."
        ) from exc
    except RevisionNotFoundError as exc:
        raise AdapterNotFoundError(f"Cannot find '{filename}': revision '{revision}' not found in {where}.") from exc
    except LocalEntryNotFoundError as exc:
        if not required:
            return None
        status = _http_status(exc)
        if status is not None:  # huggingface_hub reports an HTTP error of its metadata call this way
            reason = f"the Hub answered HTTP {status} ({_cause_text(exc)})"
        elif offline:
            reason = "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only)"
        else:
            reason = "the Hub is unreachable"
        raise AdapterNotFoundError(
            f"Cannot find '{filename}' for {where}: it is not in the local Hub cache and {reason}. "
            "Download it while online, or pass a local folder."
        ) from exc
    except EntryNotFoundError as exc:
        if not required:
            return None
        raise AdapterNotFoundError(f"The Hub repo {where} has no file '{filename}'.") from exc
    except (OfflineModeIsEnabled, ConnectionError, TimeoutError, HfHubHTTPError, HTTPError, OSError) as exc:
        raise AdapterNotFoundError(
            f"Cannot download '{filename}' from {where}: {type(exc).__name__}: {exc}"
        ) from exc


def _causes(exc: BaseException):
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status code of the first error in ``exc``'s cause chain that carries a response."""
    for e in _causes(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _cause_text(exc: BaseException) -> str:
    for e in _causes(exc):
        if getattr(getattr(e, "response", None), "status_code", None) is not None:
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return type(exc).__name__

