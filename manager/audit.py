"""Audit log: who changed what, when. Appended by `Bastion.change()`, so every change is recorded once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    author TEXT NOT NULL,
    action TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
"""


class Audit:
    def __init__(self, path: Path):
        self.path = path
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def record(self, author: str, action: str) -> None:
        db = self._connect()
        try:
            with db:
                db.execute("INSERT INTO audit (time, author, action) VALUES (?, ?, ?)", (time.time(), author, action))
        finally:
            db.close()

    def entries(self, since: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
        db = self._connect()
        try:
            rows = db.execute("SELECT time, author, action FROM audit WHERE time >= ? ORDER BY id DESC LIMIT ?",
                              (since or 0, limit))
            return [dict(r) for r in rows]
        finally:
            db.close()
