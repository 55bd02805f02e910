"""The SQLite store: typed models, sessions, migrations applied on open."""

from simsearch.store.database import Store, migrations_dir
from simsearch.store.models import (
    STATUS_FAILED,
    STATUS_INDEXED,
    Embedding,
    Image,
    Setting,
    Tombstone,
)

__all__ = [
    "STATUS_FAILED",
    "STATUS_INDEXED",
    "Embedding",
    "Image",
    "Setting",
    "Store",
    "Tombstone",
    "migrations_dir",
]
