"""Generation state and inference paths."""

from .kv_cache import KVCache

__all__ = ["KVCache"]
