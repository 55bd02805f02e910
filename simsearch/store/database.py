"""Opening a store's SQLite database: pragmas, migrations applied on open, the writer lock."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from simsearch.errors import StoreError, StoreLockedError
from simsearch.store.models import Setting

log = logging.getLogger(__name__)

DB_NAME = "simsearch.db"
WRITE_LOCK_NAME = "write.lock"
MIGRATE_LOCK_NAME = "migrate.lock"


def migrations_dir() -> Path:
    """Alembic scripts: inside the installed wheel, or `migrations/` of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError(
        f"simsearch's database migrations are missing (looked in {package / '_migrations'}); "
        "reinstall simsearch with `pip install --force-reinstall simsearch`"
    )


def _alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _set_sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record) -> None:
    # Python's sqlite3 (before 3.12) neither wraps DDL nor SELECTs in transactions: turn its
    # own handling off and let SQLAlchemy's BEGIN (below) make every transaction real, so a
    # migration killed midway rolls back and a read sees one snapshot.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers (queries) keep working while `index` writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _begin(connection) -> None:
    connection.exec_driver_sql("BEGIN")


class Store:
    """A store directory: the SQLite database, the FAISS index files beside it, and the locks."""

    def __init__(self, root: Path, engine: Engine) -> None:
        self.root = root
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_lock: FileLock | None = None

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    @classmethod
    def open(cls, root: Path, *, create: bool) -> Store:
        """Open (or create) the store at `root`, upgrading its schema to the current version."""
        root = Path(root)
        db_path = root / DB_NAME
        if not db_path.exists():
            if not create:
                raise StoreError(
                    f"no simsearch store at {root}; index some images first with "
                    f"`simsearch index DIR --store {root}`"
                )
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the store directory {root} ({exc}); "
                    "choose another place with --store or SIMSEARCH_STORE"
                ) from exc
        engine = create_engine(f"sqlite:///{db_path}")
        event.listen(engine, "connect", _set_sqlite_pragmas)
        event.listen(engine, "begin", _begin)
        store = cls(root, engine)
        try:
            store._migrate()
        except Exception:
            engine.dispose()
            raise
        return store

    def _migrate(self) -> None:
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        head = head_revision()
        try:
            with self.engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        except DBAPIError as exc:  # not a database at all, or unreadable
            raise StoreError(
                f"{self.db_path} is not a simsearch database or cannot be read "
                f"({exc.orig}); point --store at another directory"
            ) from exc
        if current == head:
            return
        lock = FileLock(str(self.root / MIGRATE_LOCK_NAME))
        with lock.acquire(timeout=60):
            with self.engine.begin() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
                if current == head:
                    return
                log.info("upgrading store %s from %s to %s", self.root, current, head)
                try:
                    command.upgrade(_alembic_config(conn), "head")
                except Exception as exc:
                    raise StoreError(
                        f"cannot upgrade the store at {self.root} from schema {current} ({exc}); "
                        "was it made by a newer simsearch? Upgrade simsearch, or use a new --store"
                    ) from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self._sessions.begin() as session:
            yield session

    def acquire_writer(self) -> None:
        """Refuse at once when another process writes to this store."""
        if self._write_lock is not None:
            return
        lock = FileLock(str(self.root / WRITE_LOCK_NAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StoreLockedError(
                f"another simsearch process is writing to the store {self.root} "
                "(an `index` or `remove` run); wait for it to finish, or use another --store"
            ) from None
        self._write_lock = lock

    def try_acquire_writer(self) -> bool:
        """Take the writer lock if it is free, without raising."""
        try:
            self.acquire_writer()
        except StoreLockedError:
            return False
        return True

    @property
    def is_writer(self) -> bool:
        return self._write_lock is not None

    def release_writer(self) -> None:
        if self._write_lock is not None:
            self._write_lock.release()
            self._write_lock = None

    def close(self) -> None:
        self.release_writer()
        self.engine.dispose()

    def get_setting(self, session: Session, key: str) -> str | None:
        row = session.get(Setting, key)
        return None if row is None else row.value

    def set_setting(self, session: Session, key: str, value: str) -> None:
        row = session.get(Setting, key)
        if row is None:
            session.add(Setting(key=key, value=value))
        else:
            row.value = value

    def settings(self) -> dict[str, str]:
        with self.session() as session:
            return {row.key: row.value for row in session.scalars(select(Setting))}
