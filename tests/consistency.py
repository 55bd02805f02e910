"""The store's invariant, checked after every scenario: index == stored vectors == indexed rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import select

from simsearch.collection import Collection
from simsearch.store import STATUS_INDEXED, Embedding, Image


def assert_consistent(store_dir: Path) -> np.ndarray:
    """Every indexed image is in the FAISS index exactly once and the index holds nothing else."""
    with Collection.open(store_dir, write=False) as collection:
        model = collection.model()
        assert model is not None
        with collection.store.session() as session:
            vector_ids = sorted(session.scalars(select(Embedding.image_id)))
            indexed_ids = sorted(
                session.scalars(
                    select(Image.id).where(
                        Image.status == STATUS_INDEXED, Image.model_id == model[0]
                    )
                )
            )
            blobs = dict(session.execute(select(Embedding.image_id, Embedding.vector)).all())
        index = collection.index()
        ids = index.ids()
        assert len(ids) == len(index) == len(set(ids.tolist()))
        assert ids.tolist() == vector_ids == indexed_ids
        if vector_ids:
            stored = np.stack([np.frombuffer(blobs[i], dtype="<f4") for i in vector_ids])
            np.testing.assert_array_equal(index.reconstruct(vector_ids), stored)
        return ids
