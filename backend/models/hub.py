"""Models from the Hugging Face Hub: downloads with progress and cancel, and the local cache.

``fetch_model`` downloads exactly the files the loaders read (configs, tokenizer, the
non-variant weights) through ``huggingface_hub.hf_hub_download`` into the usual hub cache,
reporting bytes done and total, the rate and the file being fetched, and checking the
cancel flag with every chunk. A cancelled download leaves only huggingface_hub's own
``.incomplete`` blob (resumed next time), never a snapshot entry that points at half a
file. Offline (``HF_HUB_OFFLINE=1``, Blender's "Allow Online Access" off) nothing is
requested: a cached snapshot is used or the error says how to get the model.

``fetch_adapter`` does the same for a LoRA or textual inversion embedding given as a hub
id: it picks the one weight file the way diffusers' loaders would and downloads just that.
``fetch_model(configs_only=True)`` fetches only the configs and tokenizer a single-file
checkpoint takes from a hub id.

A hub id may also name one file of a repo, ``owner/name/path/file.safetensors`` (a
community fine-tune shipped as one checkpoint, one LoRA of a repo holding several): both
``fetch_model`` and ``fetch_adapter`` then download exactly that file (``fetch_file``) and
return its path, with the same progress, cancel, offline and cache rules.

``list_cached`` and ``remove_cached`` are what the add-on's preferences show and do. No
torch here: the worker answers cache requests without loading the ML stack.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..protocol import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    clip_text,
    hub_id_problem,
    split_hub_id,
)

log = logging.getLogger(__name__)

# Subfolders of a diffusers Stable Diffusion repo that the base-model loader reads (SDXL's
# second text encoder and tokenizer too).
BASE_FOLDERS = (
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "scheduler",
)
# Small files a loader may read next to the weights (configs, tokenizer vocabularies).
CONFIG_SUFFIXES = (".json", ".txt", ".model")
# Pickled weights in a diffusers repo's folders are .bin (PICKLE_SUFFIXES: any pickled file).
PICKLE_WEIGHTS = (".bin",)
# Seconds to wait for the Hub to answer the file listing: the slow part of a download
# is the transfer, so a Hub that does not answer this fast is treated as unreachable.
HUB_TIMEOUT = 10.0
# The rate is measured over this many recent seconds (what the network does now).
RATE_WINDOW = 3.0
# huggingface_hub reads a download in 10 MB chunks: progress and the cancel check come
# once a chunk, which is 10 s on a 1 MB/s line. 1 MB chunks keep ESC within a second.
PROGRESS_CHUNK = 1 << 20
# Where pickled weights are allowed: never by a job file's own allow_pickle field.
PICKLE_SWITCHES = "(or turn on Allow Pickled Weights in the add-on's preferences)"


class HubError(RuntimeError):
    """A model could not be fetched or found in the cache; the message names it."""


class DownloadCancelled(Exception):
    """The user cancelled a download; huggingface_hub resumes its partial file next time."""


@dataclass
class DownloadProgress:
    """Where a model download stands (one ``download`` protocol message)."""

    model: str
    file: str  # the file being fetched, relative to the repo
    bytes_done: int  # of all the files the model needs, cached ones included
    bytes_total: int
    rate: float  # bytes per second over the last RATE_WINDOW seconds
    files_done: int
    files_total: int

    def to_dict(self) -> dict[str, Any]:
        """The message payload."""
        return asdict(self)

    def describe(self) -> str:
        """One line for people: model, file, megabytes done of total, rate."""
        mb = 1e6
        text = f"downloading {self.model}"
        if self.file:
            text += f" ({self.file})"
        text += f": {self.bytes_done / mb:.1f} of {self.bytes_total / mb:.1f} MB"
        if self.rate > 0 and self.bytes_done < self.bytes_total:
            text += f" at {self.rate / mb:.1f} MB/s"
        return text


@dataclass
class DownloadHooks:
    """Where a download reports and how it learns it should stop; both optional."""

    progress: Callable[[DownloadProgress], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    # At most one progress report this often (a 4 GB file arrives in ~40000 chunks).
    every: float = 0.25


def pickle_refusal(what: str, suffix: str) -> str:
    """Why the pickled weights ``what`` (a path, or "LoRA 'owner/x/y.bin'") do not load, and
    how to allow them."""
    return (
        f"{what} is a pickled checkpoint ({suffix}): loading it can run arbitrary code. "
        "Convert it to .safetensors, or, if you trust its source, pass --allow-pickle "
        f"{PICKLE_SWITCHES}."
    )


def _listed(names: list[str], limit: int = 6) -> str:
    """``names`` joined with commas, the first ``limit`` of them and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_variant(name: str, suffix: str) -> bool:
    """True for variant weights (``x.fp16.safetensors``, ``x.non_ema.bin``) diffusers skips."""
    return "." in name[: -len(suffix)]


def _weights(names: list[str], allow_pickle: bool) -> list[str]:
    """The non-variant weights of one folder: safetensors, else (if allowed) pickled .bin."""
    for suffixes in (SAFE_SUFFIXES, PICKLE_WEIGHTS if allow_pickle else ()):
        found = [
            n
            for n in names
            for s in suffixes
            if n.endswith(s) and not _is_variant(n.rsplit("/", 1)[-1], s)
        ]
        if found:
            return found
    return []


def model_kind(files: list[str]) -> str:
    """ "base" for a diffusers pipeline repo (model_index.json), else "single" (one model)."""
    return "base" if "model_index.json" in files else "single"


def needed_files(files: list[str], allow_pickle: bool = False) -> list[str]:
    """The files of a repo the loaders read: configs, tokenizer and non-variant weights."""
    by_folder: dict[str, list[str]] = collections.defaultdict(list)
    for name in files:
        folder = name.rsplit("/", 1)[0] if "/" in name else ""
        by_folder[folder].append(name)
    folders = BASE_FOLDERS if model_kind(files) == "base" else ("",)
    wanted = ["model_index.json"] if model_kind(files) == "base" else []
    for folder in folders:
        names = sorted(by_folder.get(folder, []))
        wanted += [n for n in names if n.endswith(CONFIG_SUFFIXES)]
        wanted += _weights(names, allow_pickle)
    return sorted(set(wanted))


def is_offline() -> bool:
    """True when huggingface_hub may not use the network (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


class _Tracker:
    """Counts the bytes of one model download and turns them into progress reports."""

    def __init__(self, model: str, sizes: dict[str, int], hooks: DownloadHooks):
        self.model, self.sizes, self.hooks = model, sizes, hooks
        self.total = sum(sizes.values())
        self.finished = 0  # bytes of completed (or already cached) files
        self.current = 0  # bytes of the file being fetched
        self.files_done = 0
        self.file = ""
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.last_report = 0.0

    @property
    def done(self) -> int:
        """Bytes on disk so far."""
        return self.finished + self.current

    def rate(self, now: float) -> float:
        """Bytes per second over the recent window."""
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def check_cancel(self) -> None:
        """Raise DownloadCancelled when the user asked to stop."""
        if self.hooks.should_cancel is not None and self.hooks.should_cancel():
            raise DownloadCancelled(f"download of {self.model} cancelled")

    def report(self, force: bool = False) -> None:
        """Send a progress report, at most every ``hooks.every`` seconds unless forced."""
        now = time.monotonic()
        rate = self.rate(now)
        if self.hooks.progress is None or (not force and now - self.last_report < self.hooks.every):
            return
        self.last_report = now
        self.hooks.progress(
            DownloadProgress(
                self.model, self.file, self.done, self.total, rate, self.files_done, len(self.sizes)
            )
        )

    def start_file(self, name: str) -> None:
        """A file begins (or resumes)."""
        self.file, self.current = name, 0
        self.check_cancel()
        self.report(force=True)

    def advance(self, n: float) -> None:
        """Bytes arrived for the current file."""
        self.current += int(n)
        self.check_cancel()
        self.report()

    def finish_file(self, name: str) -> None:
        """A file is complete in the cache."""
        self.finished += self.sizes.get(name, self.current)
        self.current = 0
        self.files_done += 1

    def bar_class(self) -> type:
        """A tqdm class for hf_hub_download that feeds this tracker (and prints nothing)."""
        from huggingface_hub.utils import tqdm as hf_tqdm

        tracker = self

        class TrackerBar(hf_tqdm):
            def __init__(self, *args: Any, **kwargs: Any):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)
                tracker.current = int(kwargs.get("initial") or 0)  # a resumed download

            def update(self, n: float | None = 1) -> bool | None:
                tracker.advance(n or 0)
                return super().update(n)

        return TrackerBar


def inside_cache(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """``path`` resolved (links and ``..`` followed), if it lies inside the hub cache;
    HubError naming it otherwise (a ``refs/main`` of ``../../..`` must lead nowhere)."""
    root = cache_location(cache_dir).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise HubError(f"{path} leads to {resolved}, outside the hub cache {root}: not used")
    return resolved


# A cache ref (refs/main) holds a commit hash; anything else is not followed.
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _main_ref(repo_folder: Path) -> str | None:
    """The commit a cached repo's refs/main names, or None when it names none (or is no
    commit hash: a path like ``../../..`` is never followed)."""
    ref = repo_folder / "refs" / "main"
    try:
        text = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None
    if _COMMIT.fullmatch(text):
        return text
    if text:
        log.warning("%s holds no commit hash; the cached copy is not used", ref)
    return None


def cached_snapshot(model: str, cache_dir: str | Path | None = None) -> Path | None:
    """The cached snapshot folder of hub model ``model`` (its main revision), or None."""
    from huggingface_hub import try_to_load_from_cache

    if _main_ref(_repo_folder(model, cache_dir)) is None:
        return None
    for marker in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(model, marker, cache_dir=cache_dir)
        if isinstance(found, str):
            inside_cache(found, cache_dir)
            return inside_cache(Path(found).parent, cache_dir)
    return None


def _snapshot_of(path: str, name: str) -> Path:
    """The snapshot folder holding the cached file ``path`` of repo file ``name``."""
    folder = Path(path)
    for _ in name.split("/"):
        folder = folder.parent
    return folder


@dataclass(frozen=True)
class _Subject:
    """What is downloaded, for messages: its label and the local alternatives to offer."""

    label: str  # "model", "LoRA", ...
    local: str  # what to give instead, "a local folder or .safetensors file"
    switches: str  # where to give it


MODEL = _Subject(
    "model",
    "a local folder or .safetensors file",
    "--model / --controlnet, or the add-on's model preferences",
)
CONFIG = _Subject(
    "model config",
    "a local diffusers folder of the same architecture",
    "--model-config / --controlnet-config, or the job's model_config / controlnets[].config",
)
ADAPTERS = {
    "lora": _Subject(
        "LoRA", "a local .safetensors file", "--lora, or the add-on's LoRAs & Embeddings list"
    ),
    "embedding": _Subject(
        "embedding",
        "a local .safetensors file",
        "--embedding, or the add-on's LoRAs & Embeddings list",
    ),
}


def _offline_error(subject: _Subject, model: str) -> HubError:
    return HubError(
        f"{subject.label} {model!r} is not downloaded and online access is off "
        "(HF_HUB_OFFLINE): turn on Allow Online Access in Blender's Preferences > System > "
        f"Network, or give {subject.local}"
    )


class _OutOfReach(Exception):
    """The Hub did not answer the listing (the cause is chained)."""


def _listing(subject: _Subject, model: str, endpoint: str | None) -> Any:
    """The Hub's file listing of repo ``model`` with sizes; HubError when it is not there,
    _OutOfReach when the Hub does not answer."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi(endpoint=endpoint).model_info(model, files_metadata=True, timeout=HUB_TIMEOUT)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise HubError(
            f"{subject.label} {model!r} is not on the Hugging Face Hub (or is gated): {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 (connection errors differ between hub versions)
        raise _OutOfReach(exc) from exc


def _unreachable_error(subject: _Subject, model: str, exc: BaseException) -> HubError:
    return HubError(
        f"cannot download {subject.label} {model!r}: the Hugging Face Hub is out of reach "
        f"({type(exc).__name__}: {clip_text(str(exc), 200)}) and it is not in the local "
        f"cache: connect to the internet once so it downloads, or give {subject.local} "
        f"({subject.switches})"
    )


def _listing_or_cached(
    subject: _Subject,
    model: str,
    endpoint: str | None,
    cached: Callable[[], Path | None],
    repo: str | None = None,
) -> tuple[Any, Path | None]:
    """(the Hub's listing of ``repo``, default ``model``, None), or (None, the cached copy
    ``cached`` finds) when offline or when the Hub is out of reach; the HubError that says
    what to do (naming ``model``) when there is none."""
    if is_offline():
        found = cached()
        if found is None:
            raise _offline_error(subject, model)
        return None, found
    try:
        return _listing(subject, repo or model, endpoint), None
    except _OutOfReach as exc:
        found = cached()
        if found is not None:
            log.warning("the Hub is out of reach (%s); using the cached %s", exc.__cause__, model)
            return None, found
        raise _unreachable_error(subject, model, exc.__cause__ or exc) from exc.__cause__


def _download(
    subject: _Subject,
    model: str,
    info: Any,
    names: list[str],
    hooks: DownloadHooks,
    cache_dir: str | Path | None,
    endpoint: str | None,
) -> dict[str, Path]:
    """Download ``names`` of ``model`` at the listed commit, reporting progress and checking
    cancel with every chunk; the cached path of each file."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, PROGRESS_CHUNK)
    tracker = _Tracker(model, {n: sizes.get(n, 0) for n in names}, hooks)
    bar = tracker.bar_class()
    paths: dict[str, Path] = {}
    for name in names:
        cached = try_to_load_from_cache(model, name, cache_dir=cache_dir, revision=info.sha)
        if isinstance(cached, str):
            tracker.finish_file(name)
            paths[name] = Path(cached)
            continue
        tracker.start_file(name)
        try:
            path = hf_hub_download(
                model,
                name,
                revision=info.sha,
                cache_dir=cache_dir,
                endpoint=endpoint,
                tqdm_class=bar,
            )
        except DownloadCancelled:
            raise
        except Exception as exc:  # noqa: BLE001 (network errors differ between hub versions)
            raise HubError(
                f"download of {subject.label} {model!r} failed at {name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        tracker.finish_file(name)
        paths[name] = Path(path)
    tracker.file = ""
    tracker.report(force=True)
    if paths:
        name = names[0]
        _remember_main(_snapshot_of(str(paths[name]), name), info.sha)
    return paths


def config_files(files: list[str]) -> list[str]:
    """The files of a repo diffusers' single-file loaders read for configs: every .json,
    .txt and .model (configs, tokenizer), as ``from_single_file(config=hub id)`` fetches."""
    return sorted(n for n in files if n.endswith(CONFIG_SUFFIXES))


def _split(subject: _Subject, hub_id: str) -> tuple[str, str]:
    """(repo, file) of ``hub_id`` (file "" for a whole repo); HubError naming it otherwise."""
    problem = hub_id_problem(hub_id)
    if problem:
        raise HubError(f"{subject.label} {hub_id!r} is not a hub id: {problem}")
    return split_hub_id(hub_id)


def _cached_file(repo: str, filename: str, cache_dir: str | Path | None) -> Path | None:
    """The cached copy of file ``filename`` of ``repo``'s main revision, or None."""
    from huggingface_hub import try_to_load_from_cache

    if _main_ref(_repo_folder(repo, cache_dir)) is None:
        return None
    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    if not isinstance(found, str):
        return None
    inside_cache(found, cache_dir)
    return Path(found)


def _weight_files(files: list[str]) -> list[str]:
    """The files of a listing with a weight suffix: .safetensors first, then pickled ones."""
    found = [n for n in files if n.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)]
    return sorted(found, key=lambda n: (not n.lower().endswith(SAFE_SUFFIXES), n))


def _no_such_file(subject: _Subject, repo: str, filename: str, files: list[str]) -> HubError:
    """The error for a file id whose file the repo does not hold, listing what it holds."""
    weights = _weight_files(files)
    held = f"its weight files: {_listed(weights)}" if weights else "it holds no weight files"
    return HubError(f"{subject.label} repo {repo!r} has no file {filename!r} ({held})")


def fetch_file(
    hub_id: str,
    subject: _Subject = MODEL,
    *,
    allow_pickle: bool = False,
    hooks: DownloadHooks | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download the one file that ``hub_id`` (owner/name/path/file) names; its cached path.

    Nothing else of the repo is fetched. A pickled file is refused before any request unless
    ``allow_pickle``; offline, or with the Hub out of reach, the cached copy is used or the
    HubError says what to do.
    """
    repo, filename = _split(subject, hub_id)
    if not filename:
        raise HubError(f"{subject.label} {hub_id!r} names a whole repo, not one file in it")
    suffix = "." + filename.rsplit(".", 1)[-1].lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise HubError(pickle_refusal(f"{subject.label} {hub_id!r}", suffix))
    info, found = _listing_or_cached(
        subject, hub_id, endpoint, lambda: _cached_file(repo, filename, cache_dir), repo
    )
    if found is not None:
        return found
    files = [s.rfilename for s in info.siblings or []]
    if filename not in files:
        raise _no_such_file(subject, repo, filename, files)
    hooks = hooks or DownloadHooks()
    return _download(subject, repo, info, [filename], hooks, cache_dir, endpoint)[filename]


def _not_diffusers(subject: _Subject, model: str, files: list[str]) -> HubError:
    """The error for a repo with no diffusers layout: name one of its files instead."""
    weights = _weight_files(files)
    text = f"{subject.label} {model!r} is not a diffusers repo (no model_index.json or config.json)"
    if weights:
        text += (
            f"; to load one checkpoint of it give {model}/<file>, e.g. "
            f"'{model}/{weights[0]}' (its weight files: {_listed(weights)})"
        )
    return HubError(text)


def fetch_model(
    model: str,
    *,
    allow_pickle: bool = False,
    hooks: DownloadHooks | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    configs_only: bool = False,
) -> Path:
    """Download what the loaders need of hub model ``model``; its local snapshot folder, or,
    for one file of a repo (owner/name/path/file.safetensors), that file's path.

    ``configs_only``: just the configs and tokenizer (``config_files``), for a single-file
    checkpoint that takes its configs from ``model``.
    """
    subject = CONFIG if configs_only else MODEL
    if _split(subject, model)[1]:
        if configs_only:
            raise HubError(
                f"{subject.label} {model!r} names one file: configs come from a whole repo "
                "(owner/name) or a local diffusers folder"
            )
        return fetch_file(
            model,
            subject,
            allow_pickle=allow_pickle,
            hooks=hooks,
            cache_dir=cache_dir,
            endpoint=endpoint,
        )
    hooks = hooks or DownloadHooks()
    info, snapshot = _listing_or_cached(
        subject, model, endpoint, lambda: cached_snapshot(model, cache_dir)
    )
    if snapshot is not None:
        return snapshot
    files = [s.rfilename for s in info.siblings or []]
    if not configs_only and not {"model_index.json", "config.json"} & set(files):
        raise _not_diffusers(subject, model, files)  # before downloading what cannot load
    names = config_files(files) if configs_only else needed_files(files, allow_pickle)
    if not names:
        what = "configs (.json)" if configs_only else "diffusers weights (.safetensors)"
        raise HubError(f"{subject.label} {model!r} has no {what} to load")
    paths = _download(subject, model, info, names, hooks, cache_dir, endpoint)
    return _snapshot_of(str(paths[names[0]]), names[0])


# --------------------------------------------------------------------------- adapters

# diffusers' names for a LoRA and a textual inversion embedding (``weight_name`` defaults).
ADAPTER_WEIGHT_NAMES = {"lora": "pytorch_lora_weights", "embedding": "learned_embeds"}
# Paths diffusers never takes for a LoRA (training state: checkpoint-500/, optimizer.bin).
NOT_ADAPTER_WEIGHTS = ("scheduler", "optimizer", "checkpoint")


def adapter_candidates(files: list[str], kind: str, allow_pickle: bool = False) -> list[str]:
    """The files of a repo that could be its ``kind`` ("lora" or "embedding") weights.

    As diffusers guesses a ``weight_name``: .safetensors (pickles only when allowed and
    there is no .safetensors), no training state, and the conventional name
    (``pytorch_lora_weights`` / ``learned_embeds``) wherever there is one. One file is the
    answer; none or several is for the caller to report.
    """
    conventional = ADAPTER_WEIGHT_NAMES[kind]
    for suffixes in (SAFE_SUFFIXES, PICKLE_SUFFIXES if allow_pickle else ()):
        found = sorted(
            n
            for n in files
            if n.lower().endswith(suffixes) and not any(s in n for s in NOT_ADAPTER_WEIGHTS)
        )
        if not found:
            continue
        named = [n for n in found if n.rsplit("/", 1)[-1].rsplit(".", 1)[0] == conventional]
        at_root = [n for n in named if "/" not in n]
        return at_root or named or found
    return []


def adapter_weight(files: list[str], kind: str, repo: str, allow_pickle: bool = False) -> str:
    """The one weight file of adapter repo ``repo``; HubError naming it for none or several."""
    subject = ADAPTERS[kind]
    found = adapter_candidates(files, kind, allow_pickle)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise HubError(
            f"{subject.label} {repo!r} has {len(found)} weight files ({_listed(found)}) and "
            f"none is named {ADAPTER_WEIGHT_NAMES[kind]}.safetensors: cannot tell which to "
            f"load; name the one you want as {repo}/<file>, e.g. '{repo}/{found[0]}' "
            f"({subject.switches})"
        )
    pickled = adapter_candidates(files, kind, allow_pickle=True)
    hint = (
        f" (it has pickled weights, {pickled[0]}: see --allow-pickle, or Allow Pickled "
        "Weights in the add-on's preferences)"
        if pickled and not allow_pickle
        else ""
    )
    raise HubError(f"{subject.label} {repo!r} has no .safetensors weights to load{hint}")


def _cached_files(model: str, cache_dir: str | Path | None) -> tuple[Path, list[str]] | None:
    """The cached snapshot of ``model``'s main revision and the files in it, or None."""
    folder = _repo_folder(model, cache_dir)
    commit = _main_ref(folder)
    if commit is None:
        return None
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    inside_cache(snapshot, cache_dir)
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    return snapshot, sorted(files)


def _cached_adapter(
    model: str, kind: str, allow_pickle: bool, cache_dir: str | Path | None
) -> Path | None:
    """The cached weight file of adapter ``model``, or None when none is cached."""
    cached = _cached_files(model, cache_dir)
    if cached is None or not adapter_candidates(cached[1], kind, allow_pickle):
        return None
    snapshot, files = cached
    return snapshot / adapter_weight(files, kind, model, allow_pickle)


def fetch_adapter(
    model: str,
    kind: str,
    *,
    allow_pickle: bool = False,
    hooks: DownloadHooks | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download the one weight file of LoRA or embedding (``kind``) repo ``model``; its path.

    The file is chosen by ``adapter_weight``, or named in ``model``
    (owner/name/path/file.safetensors: ``fetch_file``); offline, or with the Hub out of
    reach, the cached one is used or the HubError says what to do.
    """
    if kind not in ADAPTERS:
        raise ValueError(f"kind must be one of {', '.join(ADAPTERS)}, got {kind!r}")
    subject = ADAPTERS[kind]
    if _split(subject, model)[1]:
        return fetch_file(
            model,
            subject,
            allow_pickle=allow_pickle,
            hooks=hooks,
            cache_dir=cache_dir,
            endpoint=endpoint,
        )
    info, found = _listing_or_cached(
        subject, model, endpoint, lambda: _cached_adapter(model, kind, allow_pickle, cache_dir)
    )
    if found is not None:
        return found
    name = adapter_weight([s.rfilename for s in info.siblings or []], kind, model, allow_pickle)
    paths = _download(subject, model, info, [name], hooks or DownloadHooks(), cache_dir, endpoint)
    return paths[name]


def _remember_main(snapshot: Path, commit: str) -> None:
    """Point the cache's refs/main at ``commit`` (downloads by commit hash do not), so the
    model is found offline like any model huggingface_hub downloaded itself."""
    ref = snapshot.parent.parent / "refs" / "main"
    if ref.is_file() and ref.read_text(encoding="utf-8").strip() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    partial = ref.with_name(f".main.{os.getpid()}.tmp")
    partial.write_text(commit, encoding="utf-8")
    os.replace(partial, ref)


# --------------------------------------------------------------------------- the cache


def cache_location(cache_dir: str | Path | None = None) -> Path:
    """The hub cache folder in use (HF_HUB_CACHE, or HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def list_cached(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Models in the hub cache, largest first: model, size (bytes), files, last used, path."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_location(cache_dir))
    except CacheNotFound:
        return []
    models = [
        {
            "model": repo.repo_id,
            "size": int(repo.size_on_disk),
            "files": int(repo.nb_files),
            "last_accessed": float(repo.last_accessed),
            "complete": bool(repo.revisions),
            "path": str(repo.repo_path),
        }
        for repo in info.repos
        if repo.repo_type == "model"
    ]
    return sorted(models, key=lambda m: (-m["size"], m["model"]))


def _repo_folder(model: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of hub repo ``model`` (models--owner--name), not checked."""
    from huggingface_hub.constants import REPO_ID_SEPARATOR

    return cache_location(cache_dir) / (
        "models" + REPO_ID_SEPARATOR + model.replace("/", REPO_ID_SEPARATOR)
    )


def remove_cached(model: str, cache_dir: str | Path | None = None) -> int:
    """Delete hub model ``model`` from the cache (partial downloads too); bytes freed.

    Only what lies inside the cache goes: a model folder that is a link (moved to another
    disk by hand) loses the link, never its target, and frees nothing counted; blobs that
    are links are removed as links and not counted.
    """
    folder = _repo_folder(model, cache_dir)
    if "/" not in model or ".." in model or not (folder.is_dir() or folder.is_symlink()):
        raise HubError(f"model {model!r} is not in the cache {cache_location(cache_dir)}")
    if folder.is_symlink():
        target = folder.resolve()
        folder.unlink()
        log.info("removed the link %s of %s (its target %s stays)", folder, model, target)
        return 0
    blobs = folder / "blobs"
    freed = 0
    if blobs.is_dir() and not blobs.is_symlink():
        for entry in os.scandir(blobs):
            if entry.is_file(follow_symlinks=False):
                freed += entry.stat(follow_symlinks=False).st_size
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        raise HubError(f"could not remove model {model!r} from the cache: {exc}") from exc
    return freed
