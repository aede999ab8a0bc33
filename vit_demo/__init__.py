"""vit-demo: a Vision Transformer written from scratch, loaded with weights from the Hugging Face Hub."""

from .classifier import Classifier, load_classifier
from .hub import ModelLoadError
from .model import ViTConfig, VisionTransformer

__all__ = ["Classifier", "ModelLoadError", "ViTConfig", "VisionTransformer", "load_classifier"]
