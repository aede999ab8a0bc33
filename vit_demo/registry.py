"""Which models the app offers, and the few it keeps loaded.

The list comes from `VIT_DEMO_MODELS` (comma-separated) or the curated checkpoints below; the default from
`VIT_DEMO_MODEL`. Visitors may only pick from the list unless `VIT_DEMO_ALLOW_ANY_MODEL=1`, so no input
from the page can make the server read a local path or download an arbitrary repo.

Loading is bounded: one load at a time, at most `capacity` models kept (the least recently used go first), and a
model that another client used within `busy_seconds` is never evicted to make room: such a load is refused
(`ModelsBusy`). A load that failed for a reason that will not change (a bad checkpoint) is remembered for
`FAILED_LOAD_SECONDS` and refused again at once. When any Hub id is allowed, the repos this app downloaded are
deleted from the Hugging Face cache, least recently used first, past `VIT_DEMO_HF_CACHE_MB`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from . import hub
from .classifier import Classifier, load_classifier
from .hub import ModelLoadError, looks_local

FAILED_LOAD_SECONDS = 600.0  # a checkpoint refused for what it holds is refused again at once for this long
BUSY_SECONDS = 60.0  # a model another client used this recently is not evicted for a new one
HF_CACHE_BYTES = hub._env_mb("VIT_DEMO_HF_CACHE_MB", 5000)  # the app's downloads past this are deleted (any model allowed)


class ModelsBusy(ModelLoadError):
    """Every place for a loaded model holds one that other visitors used within the last minute."""

BUNDLED = str(Path(__file__).resolve().parent / "weights" / "vit-fashion-mnist")
BUNDLED_NAME = "vit-demo/vit-fashion-mnist (bundled, offline)"
DEFAULT_MODEL = "google/vit-base-patch16-224"
CURATED = [
    "google/vit-base-patch16-224",
    "google/vit-large-patch16-224",
    "facebook/deit-tiny-patch16-224",
    "facebook/deit-small-patch16-224",
    "facebook/deit-base-patch16-224",
    "facebook/deit-base-distilled-patch16-224",
    "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
]


def default_model() -> str:
    """The model served and used by the CLI when none is named: VIT_DEMO_MODEL, else DEFAULT_MODEL."""
    return os.environ.get("VIT_DEMO_MODEL", "").strip() or DEFAULT_MODEL


def bundled_available() -> bool:
    return (Path(BUNDLED) / "config.json").exists()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class Registry:
    """The models on offer and an LRU cache of loaded Classifiers, safe to use from several threads.

    Args:
        choices: names shown in the dropdown (Hub ids, local folders, or BUNDLED_NAME).
        default: the model used when none is named.
        allow_any: also accept Hub ids that are not in `choices`.
        capacity: how many models stay loaded at once.
        device: where models run (default: the best available).
    """

    def __init__(self, choices: list[str], default: str, allow_any: bool = False, capacity: int = 3, device=None,
                 busy_seconds: float = BUSY_SECONDS, cache_bytes: int = HF_CACHE_BYTES):
        self.choices = list(dict.fromkeys([default] + list(choices)))
        self.default = default
        self.allow_any = allow_any
        self.capacity = capacity
        self.device = device
        self.busy_seconds = busy_seconds
        self.cache_bytes = cache_bytes
        self._loaded: OrderedDict[str, Classifier] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, _Pending] = {}  # models being loaded, with the callers that wait for them
        self._load_slot = threading.Lock()  # one load at a time, whatever the model
        self._users: dict[str, dict] = {}  # model -> {client: when it last asked for it}
        self._failed: dict[str, tuple[float, str]] = {}  # model -> (refused until, the sentence)
        self._downloaded: set[str] = set()  # Hub ids this registry downloaded (the only ones it deletes)

    @classmethod
    def from_env(cls, **kwargs) -> "Registry":
        """VIT_DEMO_MODEL, VIT_DEMO_MODELS and VIT_DEMO_ALLOW_ANY_MODEL, with the curated list as fallback."""
        default = default_model()
        listed = [m.strip() for m in os.environ.get("VIT_DEMO_MODELS", "").split(",") if m.strip()]
        choices = listed or CURATED + ([BUNDLED_NAME] if bundled_available() else [])
        return cls(choices, default, allow_any=_env_flag("VIT_DEMO_ALLOW_ANY_MODEL"), **kwargs)

    def make_default(self, name: str) -> None:
        """Serves `name` by default and lists it first (the app's fallback when the default cannot load)."""
        with self._lock:
            self.default = name
            self.choices = list(dict.fromkeys([name] + self.choices))

    def check_allowed(self, name: str) -> str:
        name = (name or "").strip() or self.default
        if name in self.choices:
            return name
        if self.allow_any and not looks_local(name):
            return name
        raise ModelLoadError(f"'{name}' is not one of the models this app offers: pick one from the list.")

    def get(self, name: str | None = None, client=None) -> Classifier:
        """The loaded Classifier for `name` (loading it if needed; one load per model, and one load at a time).

        Args:
            name: the model (default: the registry's default).
            client: who asks (a session or address; None for one anonymous caller): a model that a client other
                than this one used within `busy_seconds` is not evicted to make room for this one.
        Raises:
            ModelLoadError: the model cannot load, or was refused within FAILED_LOAD_SECONDS;
                ModelsBusy where every place holds a model that others use.
        """
        name = self.check_allowed(name or self.default)
        with self._lock:
            self._note_use(name, client)
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            self._refuse_if_failed(name)
            self._victims(name, client)  # refused now, before any download, if there is no room
            pending = self._loading.setdefault(name, _Pending())
            pending.callers += 1
        try:
            with pending.lock:  # callers of one model wait for its load instead of loading again
                with self._lock:
                    if name in self._loaded:
                        return self._loaded[name]
                    self._refuse_if_failed(name)  # the load this caller waited for was refused
                with self._load_slot:
                    clf = self._load(name)
                with self._lock:
                    self._loaded[name] = clf
                    self._loaded.move_to_end(name)
                    for victim in self._victims(name, client, evict=True):
                        del self._loaded[victim]
                self._trim_cache()
                return clf
        finally:
            with self._lock:  # the last caller out removes the entry; after a failure, the next one in retries
                pending.callers -= 1
                if pending.callers == 0 and self._loading.get(name) is pending:
                    del self._loading[name]

    def _load(self, name: str) -> Classifier:
        """load_classifier, with its refusals remembered and the app's share of the Hugging Face cache bounded."""
        source = BUNDLED if name == BUNDLED_NAME else name
        download = self.allow_any and not looks_local(source) and not self.available(name)
        if download:  # room for the largest download first
            self._trim_cache(self.cache_bytes - hub.MAX_WEIGHTS_BYTES, keep={name})
        try:
            clf = load_classifier(source, device=self.device)
            if isinstance(clf, Classifier):
                _check_outputs(clf)
        except ModelLoadError as e:
            if not e.transient:
                with self._lock:
                    self._failed[name] = (time.monotonic() + FAILED_LOAD_SECONDS, str(e))
            raise
        if download:
            self._downloaded.add(name)
        return clf

    def _note_use(self, name: str, client) -> None:
        """Records that `client` asked for `name` now, and forgets uses older than busy_seconds (lock held)."""
        now = time.monotonic()
        users = self._users.setdefault(name, {})
        users[client] = now
        for who, when in list(users.items()):
            if now - when > self.busy_seconds:
                del users[who]
        while len(users) > 1000:  # a flood of clients: the oldest go first
            del users[min(users, key=users.get)]

    def _in_use_by_others(self, name: str, client) -> bool:
        now = time.monotonic()
        return any(who != client and now - when <= self.busy_seconds for who, when in self._users.get(name, {}).items())

    def _victims(self, name: str, client, evict: bool = False) -> list[str]:
        """The loaded models to evict so that `name` fits, least recently used first, never one that others use
        this minute; raises ModelsBusy when there are not enough (lock held). After the load (`evict`), a model
        that others still use keeps its place and the new one is served without being kept."""
        over = len(self._loaded) + (0 if name in self._loaded else 1) - self.capacity
        if over <= 0:
            return []
        free = [m for m in self._loaded if m != name and not self._in_use_by_others(m, client)]
        if len(free) >= over:
            return free[:over]
        if evict:
            return free + [name]
        busy = [m for m in self._loaded if m not in free]
        shown = ", ".join(BUNDLED_NAME if m == BUNDLED else m for m in busy[:3])
        raise ModelsBusy(
            f"All {self.capacity} places for loaded models hold models that other visitors used within the last "
            f"minute ({shown}), so {name} cannot be loaded now: use one of those, or try again in a minute."
        )

    def _refuse_if_failed(self, name: str) -> None:
        failed = self._failed.get(name)
        if failed is None:
            return
        if time.monotonic() < failed[0]:
            raise ModelLoadError(failed[1])
        del self._failed[name]

    def _trim_cache(self, cap: int | None = None, keep: set[str] = frozenset()) -> None:
        """Deletes repos this registry downloaded and no longer keeps loaded, least recently used first, until the
        Hugging Face cache holds at most `cap` bytes (default: cache_bytes)."""
        if not self._downloaded:
            return
        with self._lock:
            kept = set(self._loaded) | set(keep) | {self.default}
        for repo_id in hub.trim_cache(self.cache_bytes if cap is None else cap, set(self._downloaded), kept):
            self._downloaded.discard(repo_id)

    def available(self, name: str) -> bool:
        """Whether `name` can load without the Hub: the bundled model, an existing local folder or file, or a Hub
        id whose weights are in the local Hugging Face cache."""
        if name == BUNDLED_NAME:
            return bundled_available()
        if looks_local(name):
            return Path(name).expanduser().exists()
        try:
            return hub.cached_weights(name) is not None
        except ValueError:  # not a valid repo id (HFValidationError)
            return False

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


def _check_outputs(clf: Classifier) -> None:
    """One forward pass of a grey image: a model whose answers are NaN or infinite is refused with a sentence."""
    cfg = clf.preprocessor.cfg
    with torch.inference_mode():
        x = clf.preprocessor.normalize(torch.full((len(cfg.mean), *cfg.input_size), 128, dtype=torch.uint8))
        logits = clf.model(x.to(clf.device, clf.dtype))
    if not bool(torch.isfinite(logits).all()):
        raise ModelLoadError(
            f"{clf.name} gives answers that are not numbers (NaN or infinite logits) for a plain grey photo: its "
            "weights or settings are damaged; use another checkpoint."
        )


class _Pending:
    """A model being loaded: its load lock, and how many callers hold or wait for it (guarded by Registry._lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.callers = 0
