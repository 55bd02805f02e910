"""A store and its FAISS index kept consistent: SQLite is the truth, index files are caches.

Every transaction that changes vectors bumps the store's *generation*. A saved index file is named
after the generation it holds (`index-<g>.faiss`); on open, the newest file is loaded and brought
up to date from the rows whose `generation` is newer (re-embedded or new vectors) and from the
tombstones (removed vectors). A kill at any moment therefore leaves a store that the next open
repairs, without re-embedding anything.

The kind of index follows the store's size (`simsearch.ann.choose_index`): exact search while it
is small, an approximate index re-ranked exactly once it is large, or the FAISS factory string
the store's `index_factory` setting names. A writer switches kinds when it saves the index, so
the file of one generation always holds one complete index of one kind.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from simsearch import ann
from simsearch.errors import InputError, ModelMismatchError, StoreError
from simsearch.index import VectorIndex, check_file
from simsearch.store import STATUS_FAILED, STATUS_INDEXED, Embedding, Image, Store, Tombstone

log = logging.getLogger(__name__)

INDEX_FILE = re.compile(r"^index-(\d+)\.faiss$")
VECTOR_DTYPE = np.dtype("<f4")
READ_CHUNK = 20_000

KEY_GENERATION = "generation"
KEY_PRUNED = "tombstones_pruned_through"
KEY_MODEL_ID = "model_id"
KEY_MODEL_SPEC = "model_spec"
KEY_DIM = "dim"
KEY_INDEX_FACTORY = "index_factory"  # a FAISS factory string, or absent for the automatic choice
AUTO = "auto"
# An automatic approximate index is rebuilt when the store has grown or shrunk this much since
# its training sample was drawn (its inverted lists are sized for that many vectors).
REBUILD_GROWTH = 4.0
# ... and goes back to exact search below this share of the threshold that created it.
FLAT_RETURN_FRACTION = 0.5


def index_file_name(generation: int) -> str:
    return f"index-{generation}.faiss"


def encode_vector(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def decode_vectors(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.empty((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPE).reshape(len(blobs), dim)


@dataclass(frozen=True, slots=True)
class KnownFile:
    """What the store remembers of a path, enough to decide whether to read the file again."""

    id: int
    path: str
    sha1: str | None
    size: int | None
    mtime_ns: int | None
    status: str
    model_id: str | None
    error: str | None


@dataclass(slots=True)
class ImageRecord:
    """A row to insert or overwrite: indexed with `vector`, or failed with `error`."""

    path: str
    sha1: str | None
    size: int | None
    mtime_ns: int | None
    width: int | None = None
    height: int | None = None
    vector: np.ndarray | None = None
    error: str | None = None
    id: int | None = None  # set: overwrite that row; None: new row


@dataclass(slots=True)
class Move:
    id: int
    path: str
    size: int
    mtime_ns: int


@dataclass(slots=True)
class Changes:
    """One transaction's worth of changes from an index run."""

    records: list[ImageRecord] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    removals: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.records or self.moves or self.removals)


class Collection:
    """The store's rows and vectors with a FAISS index that always matches them."""

    def __init__(self, store: Store, *, memory_budget: int | None = None) -> None:
        self.store = store
        self._index: VectorIndex | None = None
        self._index_generation: int | None = None
        self._saved_generation: int | None = None
        self._factory_changed = False
        self._memory_budget = memory_budget

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: Path,
        *,
        write: bool,
        index_factory: str | None = None,
        memory_budget: int | None = None,
    ) -> Collection:
        """Open for reading (queries), or for writing (takes the store's writer lock).

        `index_factory` (writers only) records a FAISS factory string for the store's index, or
        "auto" for the automatic choice; `memory_budget` (bytes) bounds the automatic choice.
        """
        store = Store.open(root, create=write)
        if write:
            try:
                store.acquire_writer()
            except Exception:
                store.close()
                raise
        collection = cls(store, memory_budget=memory_budget)
        if index_factory is not None:
            if not write:
                store.close()
                raise StoreError("internal: index_factory needs the store opened for writing")
            try:
                collection.set_index_factory(index_factory)
            except Exception:
                store.close()
                raise
        return collection

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def root(self) -> Path:
        return self.store.root

    # -- the model -----------------------------------------------------------------------
    def model(self) -> tuple[str, str, int] | None:
        """(model id, spec to load it, dimension) of the store's vectors, or None when empty."""
        settings = self.store.settings()
        if KEY_MODEL_ID not in settings:
            return None
        return settings[KEY_MODEL_ID], settings[KEY_MODEL_SPEC], int(settings[KEY_DIM])

    def set_model(self, model_id: str, spec: str, dim: int, *, replace: bool = False) -> None:
        """Record the model; with `replace`, drop every vector of the previous model."""
        self._require_writer()
        current = self.model()
        if current is not None and current[0] == model_id:
            if current[1] != spec:
                with self.store.session() as session:
                    self.store.set_setting(session, KEY_MODEL_SPEC, spec)
            return
        if current is not None and not replace:
            raise ModelMismatchError(
                f"the store {self.root} holds vectors of model {current[0]}, not {model_id}"
            )
        with self.store.session() as session:
            generation = self._generation(session) + 1
            # Vectors of two models never mix: every old vector leaves, rows stay for re-embedding.
            session.execute(delete(Embedding))
            session.execute(delete(Tombstone))
            for key, value in (
                (KEY_MODEL_ID, model_id),
                (KEY_MODEL_SPEC, spec),
                (KEY_DIM, str(dim)),
                (KEY_GENERATION, str(generation)),
                (KEY_PRUNED, str(generation)),
            ):
                self.store.set_setting(session, key, value)
        self._remove_index_files(keep=None)
        self._index = VectorIndex(dim)
        self._index_generation = generation
        self._saved_generation = None

    # -- the kind of index ---------------------------------------------------------------
    def index_factory(self) -> str | None:
        """The FAISS factory string the store asks for, or None for the automatic choice."""
        value = self.store.settings().get(KEY_INDEX_FACTORY)
        return None if value in (None, "", AUTO) else value

    def set_index_factory(self, factory: str | None) -> None:
        """Ask for an index kind ("Flat", "HNSW32", "IVF4096,PQ64x4fs"...; None or "auto" for
        the automatic choice); it takes effect when the index is next saved."""
        self._require_writer()
        factory = (factory or AUTO).strip()
        if factory.lower() == AUTO:
            factory = AUTO
        else:
            model = self.model()
            try:  # refuse a bad string now, not at the next save
                VectorIndex(model[2] if model else 64, factory)
            except ValueError as exc:
                raise InputError(f"index factory {factory!r}: {exc}") from None
        with self.store.session() as session:
            if (self.store.get_setting(session, KEY_INDEX_FACTORY) or AUTO) == factory:
                return
            self.store.set_setting(session, KEY_INDEX_FACTORY, factory)
        self._saved_generation = None  # the next save_index builds the new kind
        self._factory_changed = True

    def memory_budget(self) -> int:
        return self._memory_budget or ann.default_memory_budget()

    def wanted_index(self, n_vectors: int, dim: int) -> ann.IndexChoice:
        """The index this store should have for n vectors (its setting, else the automatic one)."""
        factory = self.index_factory()
        if factory is None:
            return ann.choose_index(n_vectors, dim, self.memory_budget())
        if factory != ann.FLAT and not ann.trainable(factory, n_vectors):
            return ann.IndexChoice(
                ann.FLAT, reason=f"{n_vectors} vectors are too few to train {factory}"
            )
        return ann.choice_for_factory(factory, n_vectors)

    def _needs_new_kind(self, index: VectorIndex) -> ann.IndexChoice | None:
        """The index to build instead of `index`, or None to keep it."""
        n = len(index)
        want = self.wanted_index(n, index.dim)
        if self.index_factory() is not None:
            return None if want.factory == index.factory else want
        # Automatic: with some hysteresis, so that a store near a threshold does not flip.
        if not index.approximate:
            return want if want.approximate else None
        if not want.approximate:
            return want if n < ann.FLAT_MAX_VECTORS * FLAT_RETURN_FRACTION else None
        if index.method < ann.SEARCH_METHOD:  # made by an older simsearch: build today's
            return want
        if index.built_for == 0:  # trained elsewhere: its size is unknown, keep it
            return None
        built = index.built_for
        grown = n / built if n >= built else built / max(n, 1)
        return want if grown >= REBUILD_GROWTH else None

    def _build_index(
        self, choice: ann.IndexChoice, dim: int, ids: np.ndarray, vectors: np.ndarray
    ) -> VectorIndex:
        """A new index of the chosen kind holding these vectors (trained on a seeded sample)."""
        log.info("building %s index of %d vectors: %s", choice.factory, len(ids), choice.reason)
        return VectorIndex.build(
            dim,
            ids,
            vectors,
            choice.factory,
            train_size=choice.train_size or None,
            nprobe=choice.nprobe,
            ef_search=choice.ef_search,
            rerank=choice.rerank,
            target_recall=choice.target_recall,
        )

    def _convert(self, index: VectorIndex, choice: ann.IndexChoice) -> VectorIndex:
        ids = index.ids()
        vectors = index.reconstruct(ids) if len(ids) else np.empty((0, index.dim), dtype=np.float32)
        return self._build_index(choice, index.dim, ids, vectors)

    # -- reading -------------------------------------------------------------------------
    @staticmethod
    def _generation(session: Session) -> int:
        from simsearch.store import Setting

        row = session.get(Setting, KEY_GENERATION)
        return 0 if row is None else int(row.value)

    def generation(self) -> int:
        with self.store.session() as session:
            return self._generation(session)

    def index(self) -> VectorIndex:
        """The FAISS index matching the store now (loaded, caught up or rebuilt once)."""
        if self._index is None:
            self._load_index()
        assert self._index is not None
        return self._index

    def known_files(self, roots: Iterable[str]) -> dict[str, KnownFile]:
        """Every row whose path lies under one of the roots (directories or files)."""
        result: dict[str, KnownFile] = {}
        with self.store.session() as session:
            for root in roots:
                prefix = root.rstrip(os.sep) + os.sep
                # A range scan on the unique path index: prefix <= path < prefix-with-last-char+1.
                upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
                query = select(
                    Image.id,
                    Image.path,
                    Image.sha1,
                    Image.size,
                    Image.mtime_ns,
                    Image.status,
                    Image.model_id,
                    Image.error,
                ).where(((Image.path >= prefix) & (Image.path < upper)) | (Image.path == root))
                for row in session.execute(query):
                    result[row.path] = KnownFile(*row)
        return result

    def indexed_by_sha1(self, sha1s: Iterable[str]) -> dict[str, int]:
        """An indexed image id for each SHA-1 that the store already has a vector for."""
        wanted = list(set(sha1s))
        found: dict[str, int] = {}
        with self.store.session() as session:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                query = (
                    select(Image.sha1, func.min(Image.id))
                    .join(Embedding, Embedding.image_id == Image.id)
                    .where(Image.sha1.in_(chunk))
                    .group_by(Image.sha1)
                )
                found.update({sha1: image_id for sha1, image_id in session.execute(query)})
        return found

    def vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Stored vectors by image id (from SQLite, the source of truth)."""
        model = self.model()
        if model is None or not ids:
            return {}
        dim = model[2]
        out: dict[int, np.ndarray] = {}
        with self.store.session() as session:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                rows = session.execute(
                    select(Embedding.image_id, Embedding.vector).where(
                        Embedding.image_id.in_(chunk)
                    )
                )
                for image_id, blob in rows:
                    out[image_id] = np.frombuffer(blob, dtype=VECTOR_DTYPE).reshape(dim).copy()
        return out

    def images(self, ids: Sequence[int]) -> dict[int, Image]:
        with self.store.session() as session:
            rows = session.scalars(select(Image).where(Image.id.in_(list(ids))))
            return {row.id: row for row in rows}

    def find_image(
        self, *, path: str | None = None, sha1: str | None = None, image_id: int | None = None
    ) -> Image | None:
        """The indexed image with that path, SHA-1 (lowest id) or id."""
        query = select(Image).join(Embedding, Embedding.image_id == Image.id)
        if path is not None:
            query = query.where(Image.path == path)
        if sha1 is not None:
            query = query.where(Image.sha1 == sha1.lower())
        if image_id is not None:
            query = query.where(Image.id == image_id)
        with self.store.session() as session:
            return session.scalars(query.order_by(Image.id).limit(1)).first()

    def failures(self) -> list[Image]:
        with self.store.session() as session:
            query = select(Image).where(Image.status == STATUS_FAILED).order_by(Image.path)
            return list(session.scalars(query))

    def counts(self) -> dict[str, int]:
        with self.store.session() as session:
            by_status = dict(
                session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
            )
            vectors = session.scalar(select(func.count()).select_from(Embedding)) or 0
        return {
            "indexed": vectors,
            "failed": by_status.get(STATUS_FAILED, 0),
            "awaiting": by_status.get(STATUS_INDEXED, 0) - vectors,
        }

    # -- writing -------------------------------------------------------------------------
    def _require_writer(self) -> None:
        if not self.store.is_writer:
            raise StoreError("internal: the store was opened read-only")

    def apply(self, changes: Changes) -> None:
        """Write one batch of changes in one transaction, then mirror it in the index."""
        self._require_writer()
        if not changes:
            return
        model = self.model()
        index = self.index() if model is not None else None
        vector_ids: list[int] = []
        vectors: list[np.ndarray] = []
        dropped: list[int] = []
        with self.store.session() as session:
            generation = self._generation(session) + 1
            for move in changes.moves:
                session.execute(
                    update(Image)
                    .where(Image.id == move.id)
                    .values(path=move.path, size=move.size, mtime_ns=move.mtime_ns)
                )
            if changes.removals:
                ids = list(changes.removals)
                session.execute(delete(Image).where(Image.id.in_(ids)))
                for image_id in ids:
                    session.merge(Tombstone(image_id=image_id, generation=generation))
            session.flush()
            for record in changes.records:
                image_id, lost_vector = self._write_record(session, record, model, generation)
                if lost_vector:
                    dropped.append(image_id)
                if record.vector is not None:
                    vector_ids.append(image_id)
                    vectors.append(record.vector)
            vectors_changed = bool(changes.removals or dropped or vector_ids)
            if vectors_changed:  # metadata-only changes keep the saved index file current
                self.store.set_setting(session, KEY_GENERATION, str(generation))
        if not vectors_changed:
            return
        # Mirror the committed transaction; on any error fall back to a rebuild next time.
        try:
            if index is not None:
                touched = np.array(list(changes.removals) + dropped + vector_ids, dtype=np.int64)
                if touched.size:
                    index.remove(touched)
                if vector_ids:
                    index.add(np.array(vector_ids, dtype=np.int64), np.stack(vectors))
                self._index_generation = generation
        except Exception:
            log.exception("the in-memory index diverged; it is rebuilt from the store")
            self._index = None
            raise

    def _write_record(
        self,
        session: Session,
        record: ImageRecord,
        model: tuple[str, str, int] | None,
        generation: int,
    ) -> tuple[int, bool]:
        """Insert or overwrite a row; returns its id and whether it lost its old vector."""
        indexed = record.vector is not None
        if indexed and model is None:
            raise StoreError("internal: set the store's model before adding vectors")
        values = dict(
            path=record.path,
            sha1=record.sha1,
            size=record.size,
            mtime_ns=record.mtime_ns,
            width=record.width,
            height=record.height,
            model_id=model[0] if indexed and model else None,
            status=STATUS_INDEXED if indexed else STATUS_FAILED,
            error=None if indexed else record.error,
        )
        if record.id is None:
            # A path that failed before (or was never seen) gets a new id only when it is new.
            existing = session.scalar(select(Image.id).where(Image.path == record.path))
            record.id = existing
        if record.id is None:
            row = Image(**values)
            session.add(row)
            session.flush()
            image_id = row.id
        else:
            image_id = record.id
            session.execute(update(Image).where(Image.id == image_id).values(**values))
        if indexed:
            assert model is not None and record.vector is not None
            if record.vector.shape != (model[2],):
                raise StoreError(
                    f"internal: vector of shape {record.vector.shape} for a store of dim {model[2]}"
                )
            session.merge(
                Embedding(
                    image_id=image_id, generation=generation, vector=encode_vector(record.vector)
                )
            )
            return image_id, False
        embedding = session.get(Embedding, image_id)
        if embedding is None:
            return image_id, False
        session.delete(embedding)
        session.merge(Tombstone(image_id=image_id, generation=generation))
        return image_id, True

    def save_index(self) -> None:
        """Write the index for the current generation atomically and drop older files.

        This is where the index changes kind when the store has crossed a size threshold (or
        its `index_factory` setting changed): the new index is built, then saved.
        """
        self._require_writer()
        if self.model() is None:
            return
        if self._index is None and not self._factory_changed:
            files = self.index_files()
            if files and files[0][0] == self.generation():
                try:  # an unchanged store whose newest file is whole: no need to load it
                    check_file(files[0][1])
                    return
                except StoreError:
                    log.info("index file %s is damaged; rebuilding it", files[0][1])
        index = self.index()
        generation = self._index_generation
        assert generation is not None
        choice = self._needs_new_kind(index)
        if choice is not None:
            index = self._index = self._convert(index, choice)
            self._saved_generation = None
        if self._saved_generation == generation:
            return
        # Not known to be current (rebuilt, caught up, converted): a file of this generation may
        # be a damaged one, so it is always rewritten.
        index.save(self.root / index_file_name(generation))
        self._saved_generation = generation
        self._remove_index_files(keep=generation)
        with self.store.session() as session:
            session.execute(delete(Tombstone).where(Tombstone.generation <= generation))
            self.store.set_setting(session, KEY_PRUNED, str(generation))

    def index_files(self) -> list[tuple[int, Path]]:
        """Saved index files, newest generation first."""
        found = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        for name in names:
            match = INDEX_FILE.match(name)
            if match:
                found.append((int(match.group(1)), self.root / name))
        return sorted(found, reverse=True)

    def _remove_index_files(self, keep: int | None) -> None:
        for generation, path in self.index_files():
            if generation != keep:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        for name in os.listdir(self.root):  # temporary files of a killed save
            if name.startswith(".index-") and name.endswith(".tmp"):
                try:
                    os.unlink(self.root / name)
                except OSError:
                    pass

    # -- loading and repair ------------------------------------------------------------------
    def _load_index(self) -> None:
        model = self.model()
        if model is None:
            raise StoreError(
                f"the store {self.root} has no images yet; run `simsearch index DIR "
                f"--store {self.root}` first"
            )
        dim = model[2]
        # One read transaction: a consistent snapshot even while `index` commits batches.
        with self.store.session() as session:
            generation = self._generation(session)
            pruned = int(self.store.get_setting(session, KEY_PRUNED) or 0)
            expected = session.scalar(select(func.count()).select_from(Embedding)) or 0
            index, base = self._load_saved(session, generation, pruned, dim)
            if index is not None and base < generation:
                self._catch_up(session, index, base, dim)
            if index is not None and len(index) != expected:
                log.warning("index file disagrees with the store; rebuilding it")
                index = None
            if index is None:
                index, base = self._rebuild(session, dim, expected), -1
        self._index = index
        self._index_generation = generation
        self._saved_generation = generation if base == generation else None
        if self.store.is_writer and self._saved_generation != generation:
            self.save_index()

    def _load_saved(
        self, session: Session, generation: int, pruned: int, dim: int
    ) -> tuple[VectorIndex | None, int]:
        for file_generation, path in self.index_files():
            if file_generation > generation or file_generation < pruned:
                continue
            # A reader of a current file maps it read-only (FAISS's mmap); others may catch up.
            mmap = not self.store.is_writer and file_generation == generation
            try:
                index = VectorIndex.load(path, mmap=mmap)
            except (StoreError, OSError) as exc:
                log.warning("%s", exc)
                continue
            if index.dim != dim:
                continue
            return index, file_generation
        return None, -1

    def _catch_up(self, session: Session, index: VectorIndex, base: int, dim: int) -> None:
        stale = [
            row[0]
            for row in session.execute(
                select(Tombstone.image_id).where(Tombstone.generation > base)
            )
        ]
        fresh_ids, fresh_vectors = self._read_vectors(session, Embedding.generation > base, dim)
        touched = np.array(stale + fresh_ids.tolist(), dtype=np.int64)
        if touched.size:
            index.remove(touched)
        if len(fresh_ids):
            index.add(fresh_ids, fresh_vectors)
        log.info("index caught up from generation %d: %d changed vectors", base, touched.size)

    def _rebuild(self, session: Session, dim: int, expected: int) -> VectorIndex:
        choice = self.wanted_index(expected, dim)
        if choice.approximate:
            ids, vectors = self._read_vectors(session, None, dim)
            index = self._build_index(choice, dim, ids, vectors)
        else:
            index = VectorIndex(dim)
            for ids, vectors in self._iter_vectors(session, None, dim):
                index.add(ids, vectors)
        log.info("index rebuilt from %d stored vectors", len(index))
        return index

    def _read_vectors(self, session: Session, where, dim: int) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self._iter_vectors(session, where, dim))
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @staticmethod
    def _iter_vectors(session: Session, where, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        query = select(Embedding.image_id, Embedding.vector).order_by(Embedding.image_id)
        if where is not None:
            query = query.where(where)
        ids: list[int] = []
        blobs: list[bytes] = []
        for image_id, blob in session.execute(query).yield_per(READ_CHUNK):
            ids.append(image_id)
            blobs.append(blob)
            if len(ids) >= READ_CHUNK:
                yield np.array(ids, dtype=np.int64), decode_vectors(blobs, dim)
                ids, blobs = [], []
        if ids:
            yield np.array(ids, dtype=np.int64), decode_vectors(blobs, dim)
