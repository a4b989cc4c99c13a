"""The Hugging Face Hub: one push path and one download path for generators, adapters and banks.

Pushing: `push_folder_to_hub(save, repo_id, ...)` creates the repo (and the branch `revision`), lets `save` write
the folder exactly as `save_pretrained` does (integrity record included) plus its card into a temporary folder, and
uploads that folder in one commit. Generators and adapters are model repos, banks dataset repos; all three go
through this one function.

Downloading: `download_from_hub` fetches some files of one commit of a repo (`snapshot_download` with
`allow_patterns`) and turns every "not there" into a `MissingFileError` that names the repo.

Errors of the upload are huggingface_hub's own (`HfHubHTTPError` and subclasses, e.g. a 401/403 for a wrong token),
which say what the Hub answered.
"""

import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import MissingFileError

__all__ = ["create_hub_repo", "download_from_hub", "is_repo_id", "push_folder_to_hub"]


def create_hub_repo(
    repo_id: str, *, repo_type: str = "model", private: bool | None = None, token: bool | str | None = None
) -> str:
    """Create the repo `repo_id` unless it exists; return its full id (`"name"` becomes `"<user>/name"`)."""
    return HfApi(token=token).create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id


def push_folder_to_hub(
    save: Callable[[Path, str], None],
    repo_id: str,
    *,
    repo_type: str = "model",
    commit_message: str,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    delete_patterns: list[str] | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed (and the branch `revision`), call `save(folder, full_repo_id)` to write the files
    into a temporary folder, and upload them in one commit. Files matching `delete_patterns` that the commit does not
    rewrite are deleted from the repo in the same commit. Returns huggingface_hub's `CommitInfo`."""
    api = HfApi(token=token)
    repo_id = create_hub_repo(repo_id, repo_type=repo_type, private=private, token=token)
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peft-cvae-push-") as tmp:
        folder = Path(tmp) / "upload"
        save(folder, repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type=repo_type,
            folder_path=folder,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=delete_patterns,
        )


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (`name` or `namespace/name`) rather than a path."""
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_from_hub(
    repo_id: str, *, repo_type: str, files: list[str], what: str, revision: str | None, token: str | bool | None
) -> Path:
    """Download `files` (glob patterns) of one commit of a Hub repo; turn every "not there" into `MissingFileError`."""
    kind = "dataset repo" if repo_type == "dataset" else "repo"
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, allow_patterns=files, revision=revision, token=token)
    except RevisionNotFoundError as error:
        raise MissingFileError(
            f"The Hub {kind} {repo_id!r} has no revision {revision!r}. Pass an existing branch, tag or commit."
        ) from error
    except RepositoryNotFoundError as error:  # also gated repos and private repos without a token
        raise MissingFileError(
            f"The Hub {kind} {repo_id!r} (expected: {what}) does not exist or you cannot access it. Check the repo "
            "id, and pass token= (or log in with `hf auth login`) for a private repo."
        ) from error
    except HFValidationError as error:
        raise MissingFileError(
            f"{repo_id!r} is not a valid Hub repo id ({error}); expected 'name' or 'namespace/name'. For adapter "
            "folders on disk use LoraBank.from_adapters; for a bank folder, LoraBank.from_pretrained(Path(...))."
        ) from error
    except LocalEntryNotFoundError as error:  # offline, or the Hub cannot be reached, and nothing is cached
        raise MissingFileError(
            f"Cannot download the Hub {kind} {repo_id!r}{at}: the Hub cannot be reached and it is not in the "
            f"local cache ({error}). Connect to the Hub, or pass a local folder."
        ) from error
    return Path(folder)
