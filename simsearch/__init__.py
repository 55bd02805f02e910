"""simsearch: image similarity search with the Deep Ranking network, FAISS and SQLite."""

__version__ = "0.1.0"
