"""Read a CSV, JSON Lines or JSON prompt file into records, with line numbers for error messages."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .spec import SuiteError

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class Record:
    """One data row of a file before validation."""

    index: int
    """0-based data row (the CSV header is not counted)."""
    line: int | None
    """1-based line of the file where the row starts; None for rows of a JSON array."""
    values: dict[str, object]


@dataclass(frozen=True)
class Table:
    """Parsed file: its columns in order, its rows and the SHA-256 of its bytes."""

    path: Path
    columns: tuple[str, ...]
    records: tuple[Record, ...]
    sha256: str


def sha256_of_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_table(path: Path, expected_sha256: str | None = None) -> Table:
    """Read and parse a prompt file, checking its SHA-256 first when one is expected.

    Raises SuiteError for a missing file, a hash mismatch, an unsupported suffix, bytes that are
    not UTF-8, an empty file, a CSV row with the wrong number of fields or invalid JSON.
    """
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise SuiteError(
            f"{path}: unsupported file type {path.suffix!r}; expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)}. Save the prompts as CSV with a header row or as "
            "JSON Lines with one object per line.",
            path=path,
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SuiteError(f"{path}: prompt file not found.", path=path) from None
    except OSError as error:
        raise SuiteError(f"{path}: cannot read the prompt file: {error}.", path=path) from error

    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise SuiteError(
            f"{path}: SHA-256 mismatch: expected {expected_sha256}, file has {sha256}. The shipped "
            "copy was modified or truncated; reinstall safedenoise-bench or restore the file.",
            path=path,
        )

    text = _decode_utf8(data, path)
    if not text.strip():
        raise SuiteError(
            f"{path}: the file is empty; expected a header row and at least one prompt row.",
            path=path,
        )

    if suffix == ".csv":
        columns, records = _parse_csv(text, path)
    elif suffix == ".json" and text.lstrip().startswith("["):
        columns, records = _parse_json_array(text, path)
    else:
        columns, records = _parse_json_lines(text, path)

    if not records:
        raise SuiteError(
            f"{path}: the file has a header but no data rows; add at least one prompt row.",
            path=path,
        )
    return Table(path=path, columns=columns, records=tuple(records), sha256=sha256)


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        bad = data[error.start : error.end].hex(" ")
        raise SuiteError(
            f"{path}: not valid UTF-8: byte(s) 0x{bad} at byte offset {error.start} (line {line}). "
            "Re-save the file as UTF-8, for example `iconv -f latin1 -t utf-8 IN > OUT` if it "
            "is Latin-1.",
            path=path,
            line=line,
        ) from None
    return text.removeprefix("\ufeff")


def _parse_csv(text: str, path: Path) -> tuple[tuple[str, ...], list[Record]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    columns: tuple[str, ...] | None = None
    records: list[Record] = []
    line_before = 0
    try:
        for fields in reader:
            start_line = line_before + 1
            line_before = reader.line_num
            if not fields:
                continue  # blank line
            if columns is None:
                columns = _check_header(tuple(fields), path)
                continue
            if len(fields) != len(columns):
                raise SuiteError(
                    f"{path}: line {start_line} (data row index {len(records)}) has "
                    f"{len(fields)} fields but the header has {len(columns)}. Quote fields that "
                    'contain commas ("a, b") and double any quote inside a quoted field.',
                    path=path,
                    line=start_line,
                    index=len(records),
                )
            records.append(Record(len(records), start_line, dict(zip(columns, fields))))
    except csv.Error as error:
        line = line_before + 1  # where the record that failed to parse starts
        raise SuiteError(
            f"{path}: invalid CSV in the row starting at line {line}: {error}. Check for an "
            "unclosed quote.",
            path=path,
            line=line,
        ) from error
    assert columns is not None  # the text is not blank, so the reader yields a header
    return columns, records


def _check_header(columns: tuple[str, ...], path: Path) -> tuple[str, ...]:
    seen: set[str] = set()
    duplicates = sorted({c for c in columns if c in seen or seen.add(c)})
    if duplicates:
        raise SuiteError(
            f"{path}: line 1 (header) repeats column name(s) {duplicates}; rename them so that "
            "every column name is unique.",
            path=path,
            line=1,
            column=duplicates[0],
        )
    return columns


def _parse_json_lines(text: str, path: Path) -> tuple[tuple[str, ...], list[Record]]:
    records: list[Record] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise SuiteError(
                f"{path}: line {line_number} (data row index {len(records)}) is not valid JSON: "
                f"{error.msg} at column {error.colno}. Write one JSON object per line.",
                path=path,
                line=line_number,
                index=len(records),
            ) from None
        records.append(_json_record(value, len(records), line_number, path))
    return _json_columns(records), records


def _parse_json_array(text: str, path: Path) -> tuple[tuple[str, ...], list[Record]]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise SuiteError(
            f"{path}: line {error.lineno} is not valid JSON: {error.msg} at column {error.colno}.",
            path=path,
            line=error.lineno,
        ) from None
    records = [_json_record(value, index, None, path) for index, value in enumerate(values)]
    return _json_columns(records), records


def _json_record(value: object, index: int, line: int | None, path: Path) -> Record:
    if not isinstance(value, dict):
        where = f"line {line} (data row index {index})" if line else f"data row index {index}"
        raise SuiteError(
            f"{path}: {where} is a JSON {type(value).__name__}, not an object; write each prompt "
            'as an object such as {"prompt": "...", "evaluation_seed": 42}.',
            path=path,
            line=line,
            index=index,
        )
    return Record(index, line, value)


def _json_columns(records: list[Record]) -> tuple[str, ...]:
    """Return every key of every record, in order of first appearance."""
    columns: dict[str, None] = {}
    for record in records:
        for key in record.values:
            columns.setdefault(key, None)
    return tuple(columns)


def count_csv_rows(path: Path) -> int:
    """Count the data rows of a CSV file (records, not lines: quoted fields may span lines)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return max(0, sum(1 for fields in csv.reader(handle) if fields) - 1)
