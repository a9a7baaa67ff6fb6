"""Single-device DeepSeek-V2/V3 model code; imports only torch and its siblings."""

from .transformer import Block, ModelOutput, Transformer

__all__ = ["Block", "ModelOutput", "Transformer"]
