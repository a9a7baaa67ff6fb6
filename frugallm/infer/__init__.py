"""Generation state and inference paths."""

from ..model.kv_cache import KVCache

__all__ = ["KVCache"]
