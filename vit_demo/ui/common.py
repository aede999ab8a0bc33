"""What the tabs share: the registry behind the model choice, and how work runs on the GPU where there is one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from ..classifier import Classifier
from ..hub import ModelLoadError
from ..registry import Registry
from .checks import model_name, refusal

try:  # On Hugging Face ZeroGPU hardware, inference runs under spaces.GPU; elsewhere this changes nothing.
    import spaces

    gpu = spaces.GPU if os.environ.get("SPACES_ZERO_GPU") else (lambda fn: fn)
except ImportError:
    gpu = lambda fn: fn  # noqa: E731

NO_IMAGE = "No image yet: upload a photo, take one with the webcam, paste one, or pick an example."


@dataclass
class Shared:
    """The page's shared parts: the models on offer, the photo and the model choice."""

    registry: Registry
    photo: gr.Image
    model: gr.Dropdown

    def classifier(self, name) -> Classifier:
        """The loaded model called `name` (the default when empty); refusals in one sentence."""
        try:
            return self.registry.get(model_name(name) or self.registry.default)
        except ModelLoadError as e:
            raise refusal(str(e)) from e

    def display_name(self, name) -> str:
        return self.registry.check_allowed(model_name(name) or self.registry.default)


def need(image):
    if image is None:
        raise refusal(NO_IMAGE)
    return image
