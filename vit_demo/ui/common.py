"""What the tabs share: the models on offer and the names visitors see for them, the photo and the model choice,
the hooks that run when either changes, and how work runs on the GPU where there is one.

Visitors see display names only: a Hub id as it is, the bundled model by its name, a local folder or file by its
own name (never the server path it lives at). The API accepts a display name or the registry's own name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from ..classifier import Classifier
from ..hub import ModelLoadError, looks_local
from ..registry import BUNDLED, BUNDLED_NAME, Registry
from . import checks, fair
from .checks import model_name, refusal

try:  # On Hugging Face ZeroGPU hardware, inference runs under spaces.GPU; elsewhere this changes nothing.
    import spaces

    gpu = spaces.GPU if os.environ.get("SPACES_ZERO_GPU") else (lambda fn: fn)
except ImportError:
    gpu = lambda fn: fn  # noqa: E731

NO_IMAGE = "No image yet: upload a photo, take one with the webcam, paste one, or pick an example."
DAMAGED = "This file could not be read as an image (it may be truncated or damaged): try another file."


def is_local(name: str) -> bool:
    """Whether a registry name is a folder or file on this server (not a Hub id, not the bundled model)."""
    return name != BUNDLED_NAME and looks_local(name)


def display_names(names: list[str]) -> dict[str, str]:
    """{registry name: the name visitors see}: local folders and files by their own name, made unique."""
    shown: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        label = (Path(os.path.expanduser(name)).name or name) if is_local(name) else name
        base, n = label, 2
        while label in taken:
            label, n = f"{base} ({n})", n + 1
        taken.add(label)
        shown[name] = label
    return shown


@dataclass
class Shared:
    """The page's shared parts, and the hooks the tabs register on them.

    Attributes:
        registry: the models on offer.
        photo: the photo input (a guard.PhotoInput).
        model: the model choice; its value is a display name.
        open_tab: a gr.State holding the id of the tab the visitor has open ("classify", "attention", ...).
        results: components that belong to one photo: emptied as soon as the photo or the model changes.
    """

    registry: Registry
    photo: gr.Image
    model: gr.Dropdown
    open_tab: gr.State
    results: list = field(default_factory=list)
    photo_handlers: list = field(default_factory=list)
    model_handlers: list = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # registry name -> display name

    def __post_init__(self):
        self.names = display_names(self.registry.choices)
        self._registry_names = {shown: name for name, shown in self.names.items()}

    # --- names ------------------------------------------------------------------------------------------------

    def resolve(self, name) -> str:
        """The registry's name for a model named by its display name or its registry name (default when empty)."""
        name = model_name(name) or self.display(self.registry.default)
        return self._registry_names.get(name, name)

    def display(self, name: str) -> str:
        """The name visitors see for a registry name."""
        return self.names.get(name) or (Path(name).name if is_local(name) else name)

    def display_name(self, name) -> str:
        """The display name of the model a request names (checked against the models on offer)."""
        try:
            return self.display(self.registry.check_allowed(self.resolve(name)))
        except ModelLoadError as e:
            raise refusal(self.public(str(e))) from e

    def public(self, text: str) -> str:
        """`text` with every server path of a model replaced by the model's display name."""
        return without_paths(text, self.names)

    # --- models -----------------------------------------------------------------------------------------------

    def classifier(self, name) -> Classifier:
        """The loaded model a request names (the default when empty); refusals in one sentence."""
        try:
            name = self.registry.check_allowed(self.resolve(name))  # a name not on offer loads nothing to count
            fair.count_switch(self.registry, name)  # a load counts against the client's share of switches
            return self.registry.get(name, client=checks.current_client())
        except ModelLoadError as e:
            raise refusal(self.public(str(e))) from e

    def facts(self, name, clf: Classifier) -> str:
        """One line on a loaded model: its size, shape, precision, and where its weights came from."""
        registry_name = self.resolve(name)
        return facts(self.display(registry_name), registry_name, clf)

    # --- hooks ------------------------------------------------------------------------------------------------

    def clears(self, *components) -> None:
        """Registers components that show results of one photo: they are emptied when the photo or model changes."""
        self.results.extend(components)

    def on_photo(self, fn, inputs, outputs, **kwargs) -> None:
        """Runs `fn` for each new photo (and after a model change), once the old results are gone and the photo
        passed the guard; `kwargs` go to the Gradio event (the page adds api_visibility="private")."""
        self.photo_handlers.append((fn, inputs, outputs, kwargs))

    def on_model(self, fn, inputs, outputs, **kwargs) -> None:
        """Runs `fn` after the visitor's model choice has loaded (not when it failed), before the photo handlers."""
        self.model_handlers.append((fn, inputs, outputs, kwargs))


def facts(shown: str, name: str, clf: Classifier) -> str:
    """One line on a loaded model, called `shown` on the page and `name` in the registry."""
    c = clf.config
    params = sum(p.numel() for p in clf.model.parameters())
    precision = str(clf.dtype).removeprefix("torch.")
    if name == BUNDLED_NAME:
        source = "bundled with this app (trained from scratch on Fashion-MNIST)"
    elif is_local(name):
        source = f"a local {'folder' if os.path.isdir(os.path.expanduser(name)) else 'file'}, {clf.format} format"
    else:
        source = f"the Hugging Face Hub, {clf.format} format"
    return (
        f"**{checks.text(shown)}**: {c.depth} layers, {c.num_heads} heads, {c.img_size}×{c.img_size} px input in "
        f"{c.patch_size}×{c.patch_size} patches, {len(clf.labels):,} classes, {_millions(params)} parameters, "
        f"{precision} on {clf.device.type.upper()}. Weights: {source}."
    )


def without_paths(text: str, names: dict[str, str]) -> str:
    """`text` with the server path of every local model in `names` ({registry name: display name}) and of the
    bundled model replaced by its display name."""
    paths = {name: shown for name, shown in names.items() if is_local(name)}
    paths[BUNDLED] = BUNDLED_NAME
    for path in sorted(paths, key=len, reverse=True):  # longest first: a folder inside another stays whole
        for form in sorted({path, os.path.abspath(os.path.expanduser(path))}, key=len, reverse=True):
            text = text.replace(form, paths[path])
    return text


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def relay(count: int):
    """The function of a private follow-up event that shows what its main event kept in a State for `count`
    outputs; called on its own (a raw request, with no such State in its session), it changes nothing."""

    def hand_on(kept):
        if isinstance(kept, (list, tuple)) and len(kept) == count:
            return tuple(kept)
        return tuple(gr.skip() for _ in range(count))

    return hand_on


def need(image):
    if image is None:
        raise refusal(NO_IMAGE)
    return image


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(num_classes,) logits -> probabilities, in float32."""
    return logits.float().softmax(-1)
