"""simsearch: image similarity search with the Deep Ranking network, FAISS and SQLite."""

from simsearch import _blas

_blas.configure()  # before FAISS or torch load their OpenBLAS and OpenMP

__version__ = "0.1.0"
