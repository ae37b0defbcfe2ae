"""Running the annotator loop's prebuilt Core statements: through SQLAlchemy, or straight on SQLite's DB-API.

The annotator loop (next item, submit) runs 6-8 small statements per request. Executing a Core statement costs
~40 µs of Python in SQLAlchemy (execution context, parameter processing, result metadata) for a query SQLite
answers in a few µs. On SQLite the same statements, compiled once by SQLAlchemy's own SQLite compiler (so the SQL
text is exactly what SQLAlchemy would send), run on the session's DB-API connection: the same connection and so
the same transaction, committed or rolled back by the session as before. Values get the two conversions
SQLAlchemy's SQLite types apply: JSON columns as JSON text, DateTime as its SQLite text format. Other databases
(PostgreSQL) run the statements through SQLAlchemy (`CoreRunner`); both runners answer plain tuples.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

_SQLITE = sqlite.dialect(paramstyle="qmark")


class CoreRunner:
    """The statements through SQLAlchemy Core on the session's connection."""

    def __init__(self, db: Session):
        self.conn = db.connection()

    def rows(self, stmt: Executable, params: dict) -> list[tuple]:
        return [tuple(row) for row in self.conn.execute(stmt, params)]

    def rowcount(self, stmt: Executable, params: dict) -> int:
        return self.conn.execute(stmt, params).rowcount


def _sqlite_value(value: Any) -> Any:
    """What SQLAlchemy's SQLite types bind: JSON as text, DateTime in its 'YYYY-MM-DD HH:MM:SS.ffffff' format."""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")  # the wall time as given (UTC here), like SQLAlchemy
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def _reader(column_type: Any) -> Callable[[Any], Any] | None:
    if isinstance(column_type, JSON):
        return lambda v: None if v is None else json.loads(v)
    if isinstance(column_type, DateTime):
        return lambda v: None if v is None else datetime.fromisoformat(v)
    return None


class _Compiled:
    """One statement compiled for SQLite: its SQL text, parameter order, literal defaults, column readers.
    An expanding (IN) parameter is passed as a tuple; JSON values are dicts or lists."""

    def __init__(self, stmt: Executable, params: dict):
        compiled = stmt.compile(dialect=_SQLITE, column_keys=list(params) if stmt.is_dml else None)
        sql = str(compiled)
        self.names: list[str] = []
        self.expanding: set[str] = set()
        for name in compiled.positiontup:
            if compiled.binds[name].expanding:  # an IN list: one ? per value
                sql = sql.replace(f"(__[POSTCOMPILE_{name}])", "(" + ", ".join("?" * len(params[name])) + ")")
                self.expanding.add(name)
            self.names.append(name)
        self.sql = sql
        self.defaults = {k: v for k, v in compiled.params.items() if k not in params}
        columns = getattr(stmt, "exported_columns", None) or []
        readers = [_reader(c.type) for c in columns]
        self.readers = readers if any(readers) else None

    def args(self, params: dict) -> list:
        out = []
        for name in self.names:
            value = params[name] if name in params else self.defaults[name]
            if name in self.expanding:
                out.extend(value)
            else:
                out.append(_sqlite_value(value))
        return out


_compiled: dict[tuple, _Compiled] = {}  # meant for module-level statements: a handful of entries


class SqliteRunner:
    """The same statements on the session's sqlite3 connection (see the module docstring)."""

    def __init__(self, db: Session):
        self.dbapi: sqlite3.Connection = db.connection().connection.dbapi_connection

    def _execute(self, stmt: Executable, params: dict) -> tuple[sqlite3.Cursor, _Compiled]:
        shape = tuple(len(v) if isinstance(v, tuple) else None for v in params.values())
        key = (stmt, tuple(params), shape)  # the statement itself (identity-hashed), so it stays alive
        compiled = _compiled.get(key)
        if compiled is None:
            compiled = _compiled[key] = _Compiled(stmt, params)
        args = compiled.args(params)
        try:
            return self.dbapi.execute(compiled.sql, args), compiled
        except sqlite3.IntegrityError as exc:  # what the callers catch, as through SQLAlchemy
            raise IntegrityError(compiled.sql, args, exc) from exc

    def rows(self, stmt: Executable, params: dict) -> list[tuple]:
        cursor, compiled = self._execute(stmt, params)
        rows = cursor.fetchall()
        readers = compiled.readers
        if readers is None:
            return rows
        return [tuple(v if r is None else r(v) for r, v in zip(readers, row)) for row in rows]

    def rowcount(self, stmt: Executable, params: dict) -> int:
        return self._execute(stmt, params)[0].rowcount


def runner(db: Session) -> CoreRunner | SqliteRunner:
    """The runner for the session's database. Take a new one after a commit or rollback: the session may then
    hand out another pooled connection."""
    return SqliteRunner(db) if db.get_bind().dialect.name == "sqlite" else CoreRunner(db)
