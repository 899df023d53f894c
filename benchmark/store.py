"""SQLite results store: runs, generations, raw judge scores and metrics.

One database file per output directory (``results.sqlite``). Reports read only this file, so a
leaderboard can be rebuilt, or a decision rule re-applied, without generating again.

Writes are transactional and the database runs in WAL mode with a busy timeout, so several
processes (for example accelerate ranks) can write to the same file. A generation row is written
only after its image file is on disk, which is what makes a run resumable: a job whose row exists
is finished.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    protocol_json TEXT NOT NULL,
    config_json TEXT NOT NULL,
    code_version TEXT NOT NULL,
    environment_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
    job_key TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    method TEXT NOT NULL,
    method_json TEXT NOT NULL,
    model_id TEXT NOT NULL,
    suite TEXT NOT NULL,
    suite_sha256 TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    case_id TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    guidance_scale REAL NOT NULL,
    role TEXT NOT NULL,
    target TEXT,
    attributes_json TEXT NOT NULL,
    image_path TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    seconds REAL NOT NULL,
    stats_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_by_cell ON generations (method, suite, protocol_id);
CREATE TABLE IF NOT EXISTS scores (
    job_key TEXT NOT NULL,
    judge TEXT NOT NULL,
    judge_version TEXT NOT NULL,
    scores_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_key, judge)
);
CREATE TABLE IF NOT EXISTS metrics (
    method TEXT NOT NULL,
    suite TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    n INTEGER NOT NULL,
    details_json TEXT NOT NULL,
    inputs_key TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (method, suite, protocol_id, metric)
);
"""


@dataclass(frozen=True)
class GenerationRow:
    """One finished image and everything needed to score, cite or regenerate it."""

    job_key: str
    run_id: str
    method: str
    method_json: str
    model_id: str
    suite: str
    suite_sha256: str
    protocol_id: str
    row_index: int
    case_id: str
    image_index: int
    prompt: str
    seed: int
    guidance_scale: float
    role: str
    target: str | None
    attributes_json: str
    image_path: str
    image_sha256: str
    seconds: float
    stats_json: str
    created_at: float


_GENERATION_COLUMNS = tuple(GenerationRow.__dataclass_fields__)


class ResultStore:
    """A results database at ``path``; created with its schema on first use."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        self._connection.row_factory = sqlite3.Row
        self._connection.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        # While another process creates the same file, switching it to WAL can fail at once with
        # "database is locked" instead of waiting for the busy timeout. So the set-up is retried.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._connection.execute("PRAGMA journal_mode=WAL")
                self._connection.execute("PRAGMA foreign_keys=ON")
                self._connection.executescript(_SCHEMA)
                self._check_schema_version()
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                logger.debug("results store %s is locked while opening; retrying", self.path)
                time.sleep(0.1)

    def _check_schema_version(self) -> None:
        row = self._connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._connection.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row["value"]) != SCHEMA_VERSION:
            raise RuntimeError(
                f"results store {self.path} has schema version {row['value']}, this code reads version "
                f"{SCHEMA_VERSION}; write to a new --out directory"
            )

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """Run the block in one ``BEGIN IMMEDIATE`` transaction: all of it is written, or none."""
        cursor = self._connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        else:
            cursor.execute("COMMIT")

    # Runs ---------------------------------------------------------------------------------------

    def begin_run(
        self,
        run_id: str,
        protocol_id: str,
        protocol: Mapping[str, Any],
        config: Mapping[str, Any],
        code_version: str,
        environment: Mapping[str, Any],
    ) -> None:
        """Record a run as started; a rerun of the same run id marks it running again."""
        with self.transaction() as cursor:
            cursor.execute(
                """INSERT INTO runs (run_id, created_at, status, protocol_id, protocol_json, config_json,
                                     code_version, environment_json)
                   VALUES (?, ?, 'running', ?, ?, ?, ?, ?)
                   ON CONFLICT(run_id) DO UPDATE SET status='running', finished_at=NULL,
                                                     environment_json=excluded.environment_json""",
                (
                    run_id,
                    time.time(),
                    protocol_id,
                    _dumps(protocol),
                    _dumps(config),
                    code_version,
                    _dumps(environment),
                ),
            )

    def finish_run(self, run_id: str, status: str = "finished") -> None:
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE runs SET status=?, finished_at=? WHERE run_id=?", (status, time.time(), run_id)
            )

    def runs(self) -> list[dict[str, Any]]:
        rows = self._connection.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
        return [dict(row) for row in rows]

    # Generations --------------------------------------------------------------------------------

    def finished_job_keys(self, job_keys: Iterable[str]) -> set[str]:
        """Return the subset of ``job_keys`` that already have a generation row."""
        keys = list(job_keys)
        finished: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            placeholders = ",".join("?" * len(chunk))
            rows = self._connection.execute(
                f"SELECT job_key FROM generations WHERE job_key IN ({placeholders})", chunk
            ).fetchall()
            finished.update(row["job_key"] for row in rows)
        return finished

    def add_generations(self, rows: Iterable[GenerationRow]) -> None:
        """Insert finished generations in one transaction; an existing job key is left as it is."""
        placeholders = ",".join("?" * len(_GENERATION_COLUMNS))
        values = [tuple(getattr(row, column) for column in _GENERATION_COLUMNS) for row in rows]
        with self.transaction() as cursor:
            cursor.executemany(
                f"INSERT OR IGNORE INTO generations ({','.join(_GENERATION_COLUMNS)}) VALUES ({placeholders})",
                values,
            )

    def generations(
        self,
        *,
        method: str | None = None,
        suite: str | None = None,
        protocol_id: str | None = None,
        job_keys: Iterable[str] | None = None,
    ) -> list[GenerationRow]:
        clauses, params = _where(method=method, suite=suite, protocol_id=protocol_id)
        query = "SELECT * FROM generations" + clauses + " ORDER BY method, suite, row_index, image_index"
        rows = [GenerationRow(**dict(row)) for row in self._connection.execute(query, params)]
        if job_keys is not None:
            requested_keys = set(job_keys)
            rows = [row for row in rows if row.job_key in requested_keys]
        return rows

    # Scores -------------------------------------------------------------------------------------

    def scored_job_keys(self, judge: str, job_keys: Iterable[str]) -> set[str]:
        keys = list(job_keys)
        scored: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            placeholders = ",".join("?" * len(chunk))
            rows = self._connection.execute(
                f"SELECT job_key FROM scores WHERE judge=? AND job_key IN ({placeholders})", [judge, *chunk]
            ).fetchall()
            scored.update(row["job_key"] for row in rows)
        return scored

    def add_scores(self, judge: str, judge_version: str, scores: Mapping[str, Mapping[str, Any]]) -> None:
        """Store raw per-image scores (every class) of ``judge``, keyed by job key."""
        now = time.time()
        with self.transaction() as cursor:
            cursor.executemany(
                """INSERT INTO scores (job_key, judge, judge_version, scores_json, created_at)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(job_key, judge) DO UPDATE SET judge_version=excluded.judge_version,
                       scores_json=excluded.scores_json, created_at=excluded.created_at""",
                [(key, judge, judge_version, _dumps(value), now) for key, value in scores.items()],
            )

    def judge_names(self) -> list[str]:
        """Return the judges that have stored scores, sorted."""
        rows = self._connection.execute("SELECT DISTINCT judge FROM scores ORDER BY judge")
        return [row["judge"] for row in rows]

    def scores(self, judge: str, job_keys: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        rows = self._connection.execute("SELECT job_key, scores_json FROM scores WHERE judge=?", (judge,))
        result = {row["job_key"]: json.loads(row["scores_json"]) for row in rows}
        if job_keys is not None:
            requested_keys = set(job_keys)
            result = {key: value for key, value in result.items() if key in requested_keys}
        return result

    # Metrics ------------------------------------------------------------------------------------

    def set_metric(
        self,
        *,
        method: str,
        suite: str,
        protocol_id: str,
        metric: str,
        value: float,
        n: int,
        details: Mapping[str, Any],
        inputs_key: str,
    ) -> None:
        """Store a set-level metric; ``inputs_key`` identifies the images it was computed on."""
        with self.transaction() as cursor:
            cursor.execute(
                """INSERT INTO metrics (method, suite, protocol_id, metric, value, n, details_json,
                                        inputs_key, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(method, suite, protocol_id, metric) DO UPDATE SET value=excluded.value,
                       n=excluded.n, details_json=excluded.details_json, inputs_key=excluded.inputs_key,
                       created_at=excluded.created_at""",
                (method, suite, protocol_id, metric, float(value), int(n), _dumps(details), inputs_key, time.time()),
            )

    def metric(self, method: str, suite: str, protocol_id: str, metric: str) -> dict[str, Any] | None:
        row = self._connection.execute(
            "SELECT * FROM metrics WHERE method=? AND suite=? AND protocol_id=? AND metric=?",
            (method, suite, protocol_id, metric),
        ).fetchone()
        if row is None:
            return None
        result = dict(row)
        result["details"] = json.loads(result.pop("details_json"))
        return result

    def metrics(self) -> list[dict[str, Any]]:
        rows = self._connection.execute("SELECT * FROM metrics ORDER BY protocol_id, suite, method")
        result = []
        for row in rows:
            entry = dict(row)
            entry["details"] = json.loads(entry.pop("details_json"))
            result.append(entry)
        return result


def _where(**filters: Any) -> tuple[str, list[Any]]:
    clauses = [f"{column}=?" for column, value in filters.items() if value is not None]
    params = [value for value in filters.values() if value is not None]
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
