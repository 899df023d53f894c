"""Validate parsed records against a suite specification and turn them into prompt rows."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

from .reader import Record, Table, read_table
from .spec import PromptRow, Suite, SuiteError, SuiteSpec

logger = logging.getLogger(__name__)

# Seeds go to torch.Generator.manual_seed, which accepts at most 2**64 - 1 (checked on torch 2.13).
_MAX_SEED = 2**64 - 1

# Builds the error for one row: fail(column, problem, fix).
_Fail = Callable[[str, str, str], SuiteError]


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Column names a spec resolves to in one file; None where the spec has no such column."""

    prompt: str
    seed: str | None
    guidance: str | None
    category: str | None
    id: str | None


DATA_DIR = Path(__file__).resolve().parent.parent / "data"
"""Folder that registered suites' ``file`` paths are relative to."""


def spec_path(spec: SuiteSpec, data_dir: Path = DATA_DIR) -> Path:
    """Return the path of the spec's data file."""
    file = Path(spec.file)
    return file if file.is_absolute() else data_dir / file


def load_spec(spec: SuiteSpec, data_dir: Path = DATA_DIR) -> Suite:
    """Read the spec's file, verify its SHA-256, then select and validate its rows."""
    path = spec_path(spec, data_dir)
    if spec.sha256 is None:
        logger.warning("Suite %r has no pinned SHA-256; %s is loaded unchecked.", spec.name, path)
    return build_suite(spec, read_table(path, spec.sha256))


def build_suite(spec: SuiteSpec, table: Table, *, option_hint: bool = False) -> Suite:
    """Select the spec's rows of a parsed file and validate them.

    ``option_hint`` makes a missing-column error name ``load_suite``'s keyword arguments, for
    user files and overridden columns.
    """
    columns = _resolve_columns(spec, table, option_hint)

    records = [r for r in table.records if _matches_where(r, spec, table)]
    if spec.category_filter:
        selected = {c.casefold() for c in spec.category_filter}
        records = [
            r
            for r in records
            if any(c.casefold() in selected for c in _categories(r, spec, columns))
        ]

    rows = _build_rows(records, spec, columns, table.path)
    if spec.expected_rows is not None and len(rows) != spec.expected_rows:
        raise SuiteError(
            f"{table.path}: suite {spec.name!r} selected {len(rows)} rows but "
            f"{spec.expected_rows} are documented; the suite's filter or file does not match "
            "its specification.",
            path=table.path,
        )
    return Suite(spec=spec, rows=tuple(rows), sha256=table.sha256, path=table.path)


def _resolve_columns(spec: SuiteSpec, table: Table, option_hint: bool) -> _Columns:
    def resolve(field_name: str, column: str | tuple[str, ...] | None) -> str | None:
        if column is None:
            return None
        candidates = (column,) if isinstance(column, str) else tuple(column)
        for candidate in candidates:
            if candidate in table.columns:
                return candidate
        fix = (
            f"pass --{field_name.replace('_', '-')} NAME to safebench run, or {field_name}='<name>' to load_suite "
            f"(or {field_name}=() for none)"
            if option_hint
            else "the shipped file does not match its suite specification"
        )
        raise SuiteError(
            f"{table.path}: line 1 (header): missing column "
            f"{' or '.join(map(repr, candidates))} for {field_name}; "
            f"the columns present are {list(table.columns)}. To fix: {fix}.",
            path=table.path,
            line=1,
            column=candidates[0],
        )

    prompt = resolve("prompt_column", spec.prompt_column)
    assert prompt is not None
    return _Columns(
        prompt=prompt,
        seed=resolve("seed_column", spec.seed_column),
        guidance=resolve("guidance_column", spec.guidance_column),
        category=resolve("category_column", spec.category_column),
        id=resolve("id_column", spec.id_column),
    )


def _matches_where(record: Record, spec: SuiteSpec, table: Table) -> bool:
    for column, value in spec.where:
        if column not in table.columns:
            raise SuiteError(
                f"{table.path}: suite {spec.name!r} filters on column {column!r}, which the file "
                f"does not have; the columns present are {list(table.columns)}.",
                path=table.path,
                line=1,
                column=column,
            )
        if _cell_text(record.values.get(column, "")) != value:
            return False
    return True


def _categories(record: Record, spec: SuiteSpec, columns: _Columns) -> tuple[str, ...]:
    if columns.category is None:
        return ()
    text = _cell_text(record.values.get(columns.category, ""))
    parts = [text] if spec.category_separator is None else text.split(spec.category_separator)
    return tuple(p.strip() for p in parts if p.strip())


def _build_rows(
    records: list[Record], spec: SuiteSpec, columns: _Columns, path: Path
) -> list[PromptRow]:
    used = {columns.prompt, columns.seed, columns.guidance, columns.category, columns.id}
    first_line_of_id: dict[str, str] = {}
    rows: list[PromptRow] = []

    for record in records:
        place = _place(record)

        def fail(column: str, problem: str, fix: str) -> SuiteError:
            return SuiteError(
                f"{path}: {place}, column {column!r}: {problem}. {fix}",
                path=path,
                line=record.line,
                index=record.index,
                column=column,
            )

        prompt = _required(record, columns.prompt, fail)
        if not isinstance(prompt, str):
            raise fail(
                columns.prompt,
                f"prompt {prompt!r} is not a string",
                "Write the prompt as a JSON string.",
            )
        if not prompt.strip() and spec.empty_prompt != "expected":
            if spec.empty_prompt == "error":
                raise fail(columns.prompt, "the prompt is empty", "Fill it in or delete the row.")
            logger.warning(
                "%s: %s has an empty prompt; it is kept because suite %r counts it in the "
                "denominator.",
                path,
                place,
                spec.name,
            )

        seed = spec.default_seed
        if columns.seed is not None:
            seed = _parse_seed(_required(record, columns.seed, fail), columns.seed, fail)

        guidance_scale = None
        if columns.guidance is not None:
            raw = _required(record, columns.guidance, fail)
            guidance_scale = _parse_guidance(raw, columns.guidance, fail)

        case_id = str(record.index)
        if columns.id is not None:
            case_id = _cell_text(_required(record, columns.id, fail)).strip()
            if not case_id:
                raise fail(columns.id, "the case id is empty", "Give every row a unique id.")
            if case_id in first_line_of_id:
                raise fail(
                    columns.id,
                    f"duplicate case id {case_id!r}, first seen at {first_line_of_id[case_id]}",
                    "Case ids must be unique; fix the file or pass id_column=() to number rows "
                    "by index.",
                )
            first_line_of_id[case_id] = place

        attributes = {
            key: _cell_text(value) for key, value in record.values.items() if key not in used
        }
        rows.append(
            PromptRow(
                index=record.index,
                case_id=case_id,
                prompt=prompt,
                seed=seed,
                guidance_scale=guidance_scale,
                categories=_categories(record, spec, columns),
                attributes=attributes,
            )
        )
    return rows


def _place(record: Record) -> str:
    if record.line is None:
        return f"data row index {record.index} (0-based)"
    return f"line {record.line} (1-based; data row index {record.index}, 0-based)"


def _required(record: Record, column: str, fail: _Fail) -> object:
    if column not in record.values:
        raise fail(column, "the value is missing", f"Add the key {column!r} to this row.")
    return record.values[column]


def _parse_seed(raw: object, column: str, fail: _Fail) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise fail(column, f"seed {raw!r} is not an integer", "Write the seed as a whole number.")
    try:
        seed = int(raw.strip()) if isinstance(raw, str) else raw
    except ValueError:
        raise fail(
            column,
            f"seed {raw!r} is not an integer",
            "Write the seed as a whole number such as 42.",
        ) from None
    if not 0 <= seed <= _MAX_SEED:
        raise fail(column, f"seed {seed} is out of range", f"Use a seed from 0 to {_MAX_SEED}.")
    return seed


def _parse_guidance(raw: object, column: str, fail: _Fail) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise fail(column, f"guidance scale {raw!r} is not a number", "Write it as a number.")
    try:
        value = float(raw)
    except ValueError:
        raise fail(
            column,
            f"guidance scale {raw!r} is not a number",
            "Write it as a number such as 7.5, or pass guidance_column=() to let the protocol "
            "set it.",
        ) from None
    if not math.isfinite(value) or value < 0:
        raise fail(
            column,
            f"guidance scale {raw!r} is invalid",
            "Expected a finite, non-negative number such as 7.5.",
        )
    return value


def _cell_text(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
