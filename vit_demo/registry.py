"""Which models the app offers, and the few it keeps loaded (least recently used go first).

The list comes from `VIT_DEMO_MODELS` (comma-separated) or the curated checkpoints below; the default from
`VIT_DEMO_MODEL`. Visitors may only pick from the list unless `VIT_DEMO_ALLOW_ANY_MODEL=1`, so no input
from the page can make the server read a local path or download an arbitrary repo.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from .classifier import Classifier, load_classifier
from .hub import WEIGHT_FILES, ModelLoadError, looks_local

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

    def __init__(self, choices: list[str], default: str, allow_any: bool = False, capacity: int = 3, device=None):
        self.choices = list(dict.fromkeys([default] + list(choices)))
        self.default = default
        self.allow_any = allow_any
        self.capacity = capacity
        self.device = device
        self._loaded: OrderedDict[str, Classifier] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, _Pending] = {}  # models being loaded, with the callers that wait for them

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

    def get(self, name: str | None = None) -> Classifier:
        """The loaded Classifier for `name` (loading it if needed; one load per model at a time)."""
        name = self.check_allowed(name or self.default)
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            pending = self._loading.setdefault(name, _Pending())
            pending.callers += 1
        try:
            with pending.lock:  # callers of one model wait for its load instead of loading again
                with self._lock:
                    if name in self._loaded:
                        return self._loaded[name]
                clf = load_classifier(BUNDLED if name == BUNDLED_NAME else name, device=self.device)
                with self._lock:
                    self._loaded[name] = clf
                    while len(self._loaded) > self.capacity:
                        self._loaded.popitem(last=False)
                return clf
        finally:
            with self._lock:  # the last caller out removes the entry; after a failure, the next one in retries
                pending.callers -= 1
                if pending.callers == 0 and self._loading.get(name) is pending:
                    del self._loading[name]

    def available(self, name: str) -> bool:
        """Whether `name` can load without the Hub: the bundled model, an existing local folder or file, or a Hub
        id whose weights are in the local Hugging Face cache."""
        if name == BUNDLED_NAME:
            return bundled_available()
        if looks_local(name):
            return Path(name).expanduser().exists()
        try:
            return any(isinstance(try_to_load_from_cache(name, f), str) for f in WEIGHT_FILES)
        except ValueError:  # not a valid repo id (HFValidationError)
            return False

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


class _Pending:
    """A model being loaded: its load lock, and how many callers hold or wait for it (guarded by Registry._lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.callers = 0
