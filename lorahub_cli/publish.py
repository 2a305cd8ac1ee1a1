"""Publishing a composed folder to the Hub: check every file offline, then upload them in one commit.

The checks are structural: JSON parses, tensors load, the adapter reads as LoRA factors and its
config builds a `peft.LoraConfig`. The base model is never downloaded, so an adapter that does not
fit its base model is not caught here.

Only the files a composition is made of are uploaded (an explicit list, never the whole folder),
and the token is left to huggingface_hub: this module only asks whether there is one.

torch, peft and the compose modules are imported inside the checks, so that importing this
module (which `lorahub --help` does, for DEFAULT_MESSAGE) stays instant.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import HubError, InputError, LorahubError
from .hub import api, endpoint, hub_errors

DEFAULT_MESSAGE = "Upload LoRA composed with lorahub"
_HINT = "Push a folder written by: lorahub compose --out DIR"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


@dataclass
class PushResult:
    repo: str
    url: str  # the repo's page, or its branch's page with --branch
    commit: str  # the branch's head after the push (unchanged if nothing changed)
    branch: str
    files: list[str]  # paths in the repo, sorted

    def to_json(self) -> dict:
        return asdict(self)


def check_repo_id(repo_id: str) -> None:
    """NAMESPACE/NAME by the Hub's rules; push never relies on the default namespace of a bare NAME."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise InputError(
            f"--repo '{repo_id}' is not a Hub repo id.",
            "Use NAMESPACE/NAME (letters, digits, '-', '_', '.'; at most 96 characters), e.g. --repo me/my-lora.",
        )


def check_folder(folder: str | Path) -> list[str]:
    """The files of a composition folder that push uploads, as sorted repo paths (compose/folder.py lists them).

    Raises InputError, naming the file, if the folder is not what `lorahub compose --out` writes.
    """
    from .compose.folder import ROUTER_FILE, adapter_folders, composition_files, read_composition

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"'{folder}' is not a folder.", "Give the folder written by: lorahub compose --out DIR")
    pickles = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise InputError(
            f"'{pickles[0]}' is a pickle file; push uploads safetensors only, and a pickle can run code when loaded.",
            "Delete it or move it out of the folder.",
        )
    recipe = read_composition(folder, _HINT)
    for adapter in adapter_folders(folder, recipe):
        if adapter != folder:
            read_composition(adapter, _HINT)  # each shot's folder is a task-level composition of its own
        _check_adapter(adapter)
        _check_card(adapter)
    if recipe.level == "instance":
        _check_safetensors(folder / ROUTER_FILE)
        _check_card(folder)
    return sorted(path.relative_to(folder).as_posix() for path in composition_files(folder, recipe))


def _check_adapter(folder: Path) -> None:
    from peft import LoraConfig

    from .compose.adapters import CONFIG_FILE, SAFETENSORS_FILE, load_adapter

    for name in (CONFIG_FILE, SAFETENSORS_FILE):
        if not (folder / name).is_file():
            raise InputError(
                f"'{folder}' has no {name}.", "Push a PEFT LoRA folder written by: lorahub compose --out DIR"
            )
    try:
        load_adapter(folder)
        config = LoraConfig.from_pretrained(str(folder))
    except LorahubError as error:
        raise InputError(error.message, error.hint) from None
    except Exception as error:  # noqa: BLE001 - whatever the reason, this folder does not load
        raise InputError(
            f"the adapter in '{folder}' does not load ({type(error).__name__}: {error}).",
            "Write the folder again with lorahub compose.",
        ) from None
    if not isinstance(config, LoraConfig):
        raise InputError(
            f"{folder / CONFIG_FILE} is a {type(config).__name__}, not a LoRA config.", "Push a LoRA adapter."
        )


def _check_safetensors(path: Path) -> None:
    from safetensors.torch import load_file

    try:
        load_file(path)
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: the file is unreadable either way
        raise InputError(
            f"{path} is not a readable safetensors file ({error}).", "Write the folder again with lorahub compose."
        ) from None


def _check_card(folder: Path) -> None:
    """The embedding card travels with an adapter when it is there: refuse a torn or damaged one."""
    from .cards.card import CARD_FILES, Card

    present = [name for name in CARD_FILES if (folder / name).is_file()]
    if present:
        try:
            Card.load(folder)
        except LorahubError as error:
            # Whoever mirrors the repo would drop a torn or damaged card with a warning: refuse it here instead.
            raise InputError(
                error.message, f"Rebuild the card, or delete {' and '.join(present)} to push without it."
            ) from None


def require_token() -> None:
    from huggingface_hub import get_token

    if get_token() is None:
        raise HubError(
            f"pushing to {endpoint()} needs a Hugging Face token with write access, and none is set.",
            "Log in with: hf auth login (or set HF_TOKEN).",
        )


@contextmanager
def _token_errors(repo_id: str):
    """A refused token gets a hint about the token; hub_errors would point at the network instead."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status not in (401, 403):
            raise
        raise HubError(
            f"the Hub at {endpoint()} refused to let this token write to '{repo_id}' (HTTP {status}).",
            f"Use a token with write access to '{repo_id.split('/')[0]}': hf auth login (or set HF_TOKEN).",
        ) from None


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    message: str = DEFAULT_MESSAGE,
    warn: Callable[[str], None] = lambda message: None,
) -> PushResult:
    """Check `folder` offline, then create `repo_id` (and `branch`) if missing and upload the folder in one commit.

    `private` applies only when the repo is created; an existing repo keeps its visibility (with a warning).
    """
    check_repo_id(repo_id)
    files = check_folder(folder)
    require_token()
    hub = api()
    with hub_errors(repo_id, branch), _token_errors(repo_id):
        url = str(hub.create_repo(repo_id, private=private, exist_ok=True))
        if private and not hub.model_info(repo_id).private:
            warn(f"'{repo_id}' already exists and is public; --private only applies when push creates the repo.")
        if branch:
            hub.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = hub.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=branch,
            commit_message=message,
            # Patterns match as globs: escape them so that each one is exactly one file.
            allow_patterns=[glob.escape(path) for path in files],
        )
    if branch:
        url = f"{url}/tree/{quote(branch, safe='')}"
    return PushResult(repo=repo_id, url=url, commit=commit.oid, branch=branch or "main", files=files)
