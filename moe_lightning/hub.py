"""Models by Hugging Face Hub id, from the local cache (HF_HOME / HF_HUB_CACHE) through huggingface_hub.

Nothing is fetched unless the caller opts in (`download=True`); with HF_HUB_OFFLINE=1 huggingface_hub
refuses even then."""
from __future__ import annotations

from pathlib import Path

CONFIG_PATTERNS = ("config.json", "generation_config.json")
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")


class HubError(ValueError):
    """A Hub id that cannot be resolved (one line: the id and what to do)."""


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a path on this machine (and a valid repo id)."""
    if Path(name).exists() or name.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def snapshot_dir(repo_id: str, *, download: bool = False, weights: bool = True,
                 revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id`: from the cache, or fetched when `download` (the config
    files only unless `weights`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=not download,
                                 allow_patterns=list(CHECKPOINT_PATTERNS if weights else CONFIG_PATTERNS))
    except LocalEntryNotFoundError:
        from huggingface_hub import constants
        how = "the Hub is offline (HF_HUB_OFFLINE)" if download else "pass --download to fetch it"
        raise HubError(f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
                       f"{how}, or give a model directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise HubError(f"model {repo_id!r}: {' '.join(str(e).split())}") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HubError(f"model {repo_id!r}: the cached snapshot {path} has no config.json")
    return path


def resolve_model(name: str, *, download: bool = False, weights: bool = False) -> str:
    """What hrm.hf_config.load_model and the runtime take: built-in names and paths unchanged; a Hub id
    becomes its snapshot directory (a Hub id of a built-in config that is not cached stays the id, which
    load_model knows)."""
    from hrm.hf_config import builtin_models
    if str(name).lower() in builtin_models() or not is_hub_id(str(name)):
        return str(name)
    try:
        return str(snapshot_dir(str(name), download=download, weights=weights))
    except HubError:
        if not weights and not download and _builtin_hub_id(str(name)):
            return str(name)
        raise


def _builtin_hub_id(name: str) -> bool:
    from hrm.hf_config import load_model
    try:
        load_model(name)
    except ValueError:
        return False
    return True
