"""What a model IS: configuration, layers, attention, the transformer, and HF weight import/export."""

from model.config import ModelConfig
from model.presets import PRESETS, get_preset
from model.transformer import Transformer, create_model

__all__ = ["ModelConfig", "PRESETS", "Transformer", "create_model", "get_preset"]
