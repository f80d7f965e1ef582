"""Hugging Face Hub ids ⇄ local checkpoint directories, through `huggingface_hub` (the `hub` extra).

    resolve("state-spaces/mamba-130m")          → a directory in the Hub's cache, ready for load_pretrained
    resolve("runs/default")                      → the local directory itself
    push_to_hub(model_or_directory, "me/my-mamba")

What a string means: one that is an existing local path is always that path; one that looks like `org/name`
and is not a local path is a Hub id; anything else is an error that says both.

Only the files a checkpoint needs are downloaded, chosen as checkpoint.load_pretrained chooses them: config.json
first (so that a family mambakit lacks is refused before any weight is fetched), then the first weight file of
WEIGHT_FILES the repository has (and, for an index, exactly the shards it lists), then the tokenizer files it
has. Downloads go through huggingface_hub's standard cache (HF_HOME / HF_HUB_CACHE, or cache_dir) and are
pinned to the one commit that the revision names when the download starts, so files of two commits never
mix. Offline (local_files_only=True or HF_HUB_OFFLINE=1), or when the Hub cannot be reached, the cached
snapshot of the revision is used, as huggingface_hub's own downloads do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ._io import atomic_write, read_files
from .checkpoint import (_SHARD_NAME, CONFIG_NAME, PICKLE_INDEX, SAFETENSORS_INDEX, WEIGHT_FILES, CheckpointError,
                         load_config)
from .tokenizer import TOKENIZER_FILES


_INSTALL = "pip install 'mambakit[hub]'"
# the Hub's own rule for a repository id: two parts of word characters, '-' and '.', neither starting nor
# ending with '-' or '.', at most 96 characters each, no '--' or '..'
_PART = r"\w(?:[\w.-]{0,94}\w)?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}", re.ASCII)
_UPLOADED_EXTRA = ("README.md",)  # a model card is uploaded with the checkpoint when the directory has one


class HubError(FileNotFoundError):
    """A Hub id that cannot be resolved: no such repository, revision or file, or not in the cache offline."""


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a Hub repository id (`org/name`); says nothing of local paths."""
    return bool(_HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text


def _import_hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.utils
    except ImportError:
        raise ImportError(f"Hugging Face Hub ids need huggingface_hub: {_INSTALL}") from None
    return huggingface_hub


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which huggingface_hub's HTTP client says the Hub cannot be reached (requests' are
    OSErrors, up to huggingface_hub 0.x; httpx's TransportError from 1.0 on) — its own downloads fall back to
    the cache on these."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)


def _offline_env(hub) -> bool:
    constants = hub.constants
    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _download_bars(hub, show: bool):
    """huggingface_hub's download bars on (its default) or off for the block."""
    utils = hub.utils
    if show or utils.are_progress_bars_disabled():
        yield
        return
    utils.disable_progress_bars()
    try:
        yield
    finally:
        utils.enable_progress_bars()


# ------------------------------------------------------------------------------------------ downloading
class _Repo:
    """One repository at one revision: its downloads, and errors that name the repository, revision and file."""

    def __init__(self, hub, repo_id: str, revision: str | None, cache_dir, local_files_only: bool, token,
                 endpoint: str | None):
        self.hub, self.repo_id, self.revision = hub, repo_id, revision
        self.cache_dir, self.token = cache_dir, token
        self.endpoint = endpoint or hub.constants.ENDPOINT
        self.offline = local_files_only or _offline_env(hub)
        self.unreachable = False  # offline because the Hub did not answer (not because it was asked)
        self.commit: str | None = None  # the commit every download is pinned to, once known
        self.listing: set[str] | None = None  # the repository's files at that commit (online)

    def where(self) -> str:
        return f"{self.repo_id} (revision {self.revision or 'main'})"

    def not_cached(self, filename: str, why: str) -> HubError:
        cache = self.cache_dir or self.hub.constants.HF_HUB_CACHE
        return HubError(f"{self.where()}: {filename} is not in the cache ({cache}) and {why}. Run once with "
                        f"network access to {self.endpoint}, or pass a local directory")

    def named(self, e: Exception, filename: str | None = None) -> HubError:
        """huggingface_hub's error → a HubError naming what was asked for (not a local path either)."""
        u = self.hub.utils
        local = f"{self.repo_id!r} is not a local path, and as a Hugging Face Hub id"
        if isinstance(e, u.LocalEntryNotFoundError):
            offline = self.offline and not self.unreachable
            return self.not_cached(filename or CONFIG_NAME,
                                   "the Hub is offline (local_files_only / HF_HUB_OFFLINE=1)" if offline
                                   else f"the Hub at {self.endpoint} cannot be reached")
        if isinstance(e, u.GatedRepoError):
            return HubError(f"{local}: {self.repo_id} is gated on {self.endpoint}: accept its terms on the Hub and "
                            "pass a token (token= or HF_TOKEN)")
        if isinstance(e, u.RevisionNotFoundError):
            return HubError(f"{self.repo_id} on {self.endpoint} has no revision {self.revision!r} (a branch, tag or "
                            "commit)")
        if isinstance(e, u.RepositoryNotFoundError):
            return HubError(f"{local}: no repository {self.repo_id} on {self.endpoint} (or it is private: pass a "
                            "token, token= or HF_TOKEN)")
        if isinstance(e, u.EntryNotFoundError):
            return HubError(f"{self.where()} has no file {filename} on {self.endpoint}")
        return HubError(f"{self.where()}: {filename or 'the repository'} cannot be fetched from {self.endpoint}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def list_files(self) -> None:
        """Pins the revision to a commit and lists its files, in one request; when the Hub cannot be reached,
        goes on offline from the cache (as huggingface_hub's own downloads do) with a warning."""
        if self.offline:
            return
        try:
            info = self.hub.HfApi(endpoint=self.endpoint).model_info(self.repo_id, revision=self.revision,
                                                                     token=self.token)
        except self.hub.utils.HfHubHTTPError as e:
            raise self.named(e) from None
        except _transport_errors() as e:
            warnings.warn(f"{self.where()}: the Hub at {self.endpoint} cannot be reached ({type(e).__name__}); "
                          "using the cached snapshot", stacklevel=3)
            self.offline = self.unreachable = True
            return
        self.commit = info.sha
        self.listing = {s.rfilename for s in (info.siblings or ())}

    def fetch(self, filename: str) -> Path:
        """The cached file (downloaded first where needed), from the pinned commit."""
        if self.listing is not None and filename not in self.listing:
            raise HubError(f"{self.where()} has no file {filename} on {self.endpoint}")
        try:
            return Path(self.hub.hf_hub_download(
                self.repo_id, filename, revision=self.commit or self.revision, cache_dir=self.cache_dir,
                local_files_only=self.offline, token=self.token, endpoint=self.endpoint))
        except (self.hub.utils.EntryNotFoundError, self.hub.utils.HfHubHTTPError) as e:
            raise self.named(e, filename) from None

    def remember_revision(self, snapshot: Path) -> None:
        """Records which commit the revision (a branch or tag) named, as huggingface_hub's cache does in
        refs/<revision>: downloads pinned to the commit do not write it, and offline use looks it up."""
        revision = self.revision or "main"
        if self.commit is None or revision == self.commit:
            return
        ref = snapshot.parent.parent / "refs" / revision
        if not ref.is_file() or ref.read_text() != self.commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(ref, self.commit)

    def has(self, filename: str, snapshot: Path) -> bool:
        """Whether the repository has the file: its listing online, the cached snapshot offline."""
        return filename in self.listing if self.listing is not None else os.path.lexists(snapshot / filename)


def _shards(index: Path, repo: _Repo) -> list[str]:
    """The shard files a weight index lists (plain file names only: the loader reads nothing outside its
    directory, so nothing else is fetched)."""
    shown = f"{repo.where()}: {index.name}"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{shown} is not a JSON object with a weight_map ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{shown} has no 'weight_map' object (or an empty one)")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or "\\" in n or n in (".", "..")]
    if bad:
        raise CheckpointError(f"{shown} lists the shard {bad[0]!r}, which is not a file beside it")
    return names


def resolve(path_or_repo_id: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool = False, token: str | bool | None = None, *, endpoint: str | None = None,
            progress: bool | None = None) -> Path:
    """A local directory ready for checkpoint.load_pretrained: `path_or_repo_id` itself when it is an existing
    local path, else the cached snapshot of the Hub repository `org/name` at `revision` (a branch, tag or
    commit; default main), with the files a checkpoint needs downloaded into it (see the module docstring).

    cache_dir: the Hub cache (default huggingface_hub's: HF_HUB_CACHE). local_files_only (or HF_HUB_OFFLINE=1):
    the cache only. token: for private or gated repositories (default: HF_TOKEN or the stored login). endpoint:
    the Hub's URL (default HF_ENDPOINT or huggingface.co). progress: huggingface_hub's download bars (None: its
    default on a terminal, none otherwise). Raises HubError (a FileNotFoundError) naming the repository,
    revision and file; CheckpointError (a ValueError) for a config of a family mambakit lacks, before any weight
    is downloaded; ImportError naming the extra when huggingface_hub is missing."""
    text = os.fspath(path_or_repo_id)
    local = Path(text).expanduser()
    if os.path.lexists(local) or isinstance(path_or_repo_id, os.PathLike) or not isinstance(text, str):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids; {text!r} is a local path")
        if not os.path.lexists(local):
            raise FileNotFoundError(f"checkpoint directory {text!r} does not exist")
        return local
    if not is_hub_id(text):
        raise FileNotFoundError(f"checkpoint directory {text!r} does not exist (nor is it a Hugging Face Hub id, "
                                "org/name)")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f"revision must be a branch, tag or commit name, got {revision!r}")
    hub = _import_hub()
    repo = _Repo(hub, text, revision, cache_dir, local_files_only, token, endpoint)
    with _download_bars(hub, sys.stderr.isatty() if progress is None else progress):
        repo.list_files()
        snapshot = repo.fetch(CONFIG_NAME).parent
        repo.remember_revision(snapshot)
        try:
            load_config(snapshot)  # a family mambakit lacks is refused here, before any weight is fetched
        except CheckpointError as e:
            raise CheckpointError(f"{repo.where()}: {e}") from None
        weights = next((n for n in WEIGHT_FILES if repo.has(n, snapshot)), None)
        if weights is None:
            cached = " in the cache (offline)" if repo.offline else f" on {repo.endpoint}"
            raise HubError(f"{repo.where()} has no weights{cached}: expected one of {', '.join(WEIGHT_FILES)}")
        files = [weights]
        if weights in (SAFETENSORS_INDEX, PICKLE_INDEX):
            files = _shards(repo.fetch(weights), repo)
        files += [n for n in TOKENIZER_FILES if repo.has(n, snapshot)]
        for name in files:
            repo.fetch(name)
    return snapshot


def from_pretrained(cls: type, path_or_repo_id, revision: str | None = None, cache_dir=None,
                    local_files_only: bool = False, token=None, progress: bool | None = None, **load_kwargs):
    """cls.from_pretrained (MambaLM's: dtype, device) of a local directory or a Hub id (see resolve)."""
    directory = resolve(path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                        token=token, progress=progress)
    return cls.from_pretrained(directory, **load_kwargs)


# -------------------------------------------------------------------------------------------- uploading
def _checkpoint_files(view, directory: Path) -> list[str]:
    """The files of a saved checkpoint, as the loader reads them: config.json, the weight files (and the
    shards their indexes list), the tokenizer files, plus a README.md (the model card)."""
    names = [n for n in (CONFIG_NAME, *WEIGHT_FILES, *TOKENIZER_FILES, *_UPLOADED_EXTRA) if view.path(n) is not None]
    if not any(n in names for n in WEIGHT_FILES):
        raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if index in names:
            try:
                weight_map = json.loads(view.path(index).read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{directory / index} does not parse as a weight index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if view.path(shard) is None:
                    raise CheckpointError(f"shard {shard} listed in {directory / index} is missing")
                names.append(shard)
    return names


def push_to_hub(model_or_dir: Any, repo_id: str, token: str | bool | None = None,
                private: bool = False, revision: str | None = None, *, endpoint: str | None = None,
                commit_message: str = "Upload a mambakit checkpoint") -> Any:
    """Uploads a saved checkpoint directory (or a MambaLM, saved first into a temporary directory in the
    transformers layout) to the Hub repository `repo_id` as one commit, creating the repository (private if
    asked) and the branch `revision` where they do not exist. Only the checkpoint's own files are uploaded
    (see _checkpoint_files): a training run's directory keeps its checkpoints/ and logs to itself. Checkpoint
    files of an earlier upload that this one lacks (another weight format, old shards, a tokenizer the model no
    longer has) are deleted in the same commit, as save_pretrained does locally: the revision then loads as
    exactly this checkpoint. Returns huggingface_hub's CommitInfo (.oid, .commit_url)."""
    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise ValueError(f"repo_id must be a Hub id of the form org/name, got {repo_id!r}")
    hub = _import_hub()
    if not isinstance(model_or_dir, (str, os.PathLike)):
        with tempfile.TemporaryDirectory(prefix="mambakit-push-") as tmp:
            model_or_dir.save_pretrained(tmp)
            return push_to_hub(tmp, repo_id, token=token, private=private, revision=revision, endpoint=endpoint,
                               commit_message=commit_message)
    directory = Path(model_or_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"push_to_hub: {directory} is not a checkpoint directory")
    load_config(directory)  # a directory that is not a checkpoint (or of a family mambakit lacks) is not uploaded
    api = hub.HfApi(endpoint=endpoint, token=token)
    # one consistent set of files: no save replaces them while they are uploaded (mambakit._io.read_files)
    with read_files(directory) as view:
        names = _checkpoint_files(view, directory)
        operations = [hub.CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(view.path(n))) for n in names]
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            there = {s.rfilename for s in (api.model_info(repo_id, revision=revision).siblings or ())}
            managed = {CONFIG_NAME, *WEIGHT_FILES, *TOKENIZER_FILES}
            stale = sorted(n for n in there - set(names) if n in managed or _SHARD_NAME.fullmatch(n))
            operations += [hub.CommitOperationDelete(path_in_repo=n) for n in stale]
            return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
        except hub.utils.HfHubHTTPError as e:
            raise HubError(f"push_to_hub: {repo_id} (revision {revision or 'main'}) on {api.endpoint}: "
                           f"{str(e).splitlines()[0]}") from None
