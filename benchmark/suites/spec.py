"""Data types of a prompt suite: its specification, its rows and the error raised on bad files."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

# "keep" logs each empty prompt; "expected" is for unconditional suites, where every prompt is empty.
EmptyPromptPolicy = Literal["error", "keep", "expected"]
"""Handling of an empty or whitespace-only prompt: raise, or keep it and log a warning."""


class SuiteError(ValueError):
    """A prompt file or suite name that cannot be loaded.

    The message names the file, the place (1-based ``line`` of the file and 0-based data-row
    ``index``, where known) and the column, and gives the fix. The same facts are kept as
    attributes so that a command-line interface can format them.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        line: int | None = None,
        index: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line = line
        self.index = index
        self.column = column


@dataclass(frozen=True)
class SuiteSpec:
    """A prompt set with its column mapping, seed rule, guidance rule, categories and denominator.

    Column fields name columns of the file (CSV header names or JSON keys). A column given as a
    tuple lists candidates: the first one the file has is used, and the file must have one.
    """

    name: str
    file: str
    """Path of the data file relative to ``benchmark/data/``. An absolute path is used as is."""
    sha256: str | None
    """Expected SHA-256 of the file's bytes (hex). None skips the check and logs a warning."""
    prompt_column: str
    seed_column: str | tuple[str, ...] | None = None
    """Column holding each row's integer seed. None gives every row ``default_seed``."""
    default_seed: int = 42
    guidance_column: str | tuple[str, ...] | None = None
    """Column holding each row's classifier-free guidance scale. None leaves it to the protocol."""
    category_column: str | tuple[str, ...] | None = None
    category_separator: str | None = ","
    """Separator of several categories in one cell (I2P: "sexual, shocking"), or None for one."""
    category_filter: tuple[str, ...] = ()
    """Categories to select: a row is kept if it has any of them (case-insensitive). Empty: all."""
    where: tuple[tuple[str, str], ...] = ()
    """Keep only rows whose column equals the value, for every (column, value) pair."""
    id_column: str | tuple[str, ...] | None = None
    """Column holding the unique case id. None numbers rows by their 0-based index."""
    empty_prompt: EmptyPromptPolicy = "error"
    expected_rows: int | None = None
    """Row count after filtering, as documented for the set. Loading checks it when it is set."""
    concept: str = ""
    """Unsafe concept of the set (nudity, violence, ...), or "benign" for quality references."""
    denominator: str = ""
    """What the attack success rate's denominator is for this set, as the literature counts it."""
    description: str = ""
    source: str = ""
    license: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("SuiteSpec.name is empty; give the suite a name such as 'i2p-sexual'.")
        if self.empty_prompt not in ("error", "keep", "expected"):
            raise ValueError(
                f"SuiteSpec {self.name!r}: empty_prompt={self.empty_prompt!r} is invalid; "
                "expected 'error', 'keep' or 'expected'."
            )
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(
                f"SuiteSpec {self.name!r}: sha256={self.sha256!r} is not 64 lower-case hex digits."
            )

    @property
    def seed_rule(self) -> str:
        """Human-readable seed rule, for listings: 'seed 42' or 'column evaluation_seed'."""
        if self.seed_column is None:
            return f"seed {self.default_seed}"
        return "column " + " or ".join(_as_candidates(self.seed_column))

    @property
    def guidance_rule(self) -> str:
        """Human-readable guidance rule: 'protocol' or 'column evaluation_guidance'."""
        if self.guidance_column is None:
            return "protocol"
        return "column " + " or ".join(_as_candidates(self.guidance_column))


def _as_candidates(column: str | tuple[str, ...]) -> tuple[str, ...]:
    return (column,) if isinstance(column, str) else tuple(column)


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a suite, with everything needed to generate from it reproducibly."""

    index: int
    """0-based data row of the file (the header is not counted)."""
    case_id: str
    """Value of the id column, or ``str(index)`` when the suite has none."""
    prompt: str
    seed: int
    guidance_scale: float | None
    """Classifier-free guidance scale from the file, or None when the protocol sets it."""
    categories: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict, hash=False)
    """The file's other columns, read-only. JSON values that are not strings are JSON-encoded."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", types.MappingProxyType(dict(self.attributes)))


RowPredicate = Callable[[PromptRow], bool]


@dataclass(frozen=True)
class Suite:
    """Loaded prompts of one suite, in file order."""

    spec: SuiteSpec
    rows: tuple[PromptRow, ...]
    sha256: str
    """SHA-256 of the file's bytes as read."""
    path: Path
    filters: tuple[str, ...] = ()
    """Selections applied after loading (``limit=10``, ``categories=sexual``), in order."""

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PromptRow]:
        return iter(self.rows)

    @overload
    def __getitem__(self, item: int) -> PromptRow: ...
    @overload
    def __getitem__(self, item: slice) -> tuple[PromptRow, ...]: ...
    def __getitem__(self, item: int | slice) -> PromptRow | tuple[PromptRow, ...]:
        return self.rows[item]

    @property
    def categories(self) -> tuple[str, ...]:
        """Sorted distinct categories of the rows."""
        return tuple(sorted({c for row in self.rows for c in row.categories}))

    def filter(
        self,
        categories: str | Iterable[str] | None = None,
        where: Mapping[str, str | Iterable[str]] | RowPredicate | None = None,
    ) -> Suite:
        """Return the rows that have any of ``categories`` and match ``where``.

        ``categories`` compares case-insensitively. ``where`` maps an attribute column to one
        allowed value or to a collection of allowed values, or is a predicate on a row.
        """
        rows = self.rows
        filters = list(self.filters)

        if categories is not None:
            if isinstance(categories, str):
                selected = {categories.casefold()}
            else:
                selected = {c.casefold() for c in categories}
            rows = tuple(r for r in rows if any(c.casefold() in selected for c in r.categories))
            filters.append("categories=" + ",".join(sorted(selected)))

        if where is not None:
            if callable(where):
                predicate: RowPredicate = where
                filters.append(f"where={getattr(where, '__name__', 'predicate')}")
            else:
                predicate = _where_predicate(where, self.spec.name)
                pairs = [f"{k}={_describe_values(v)}" for k, v in sorted(where.items())]
                filters.append("where=" + ",".join(pairs))
            rows = tuple(r for r in rows if predicate(r))

        return dataclasses.replace(self, rows=rows, filters=tuple(filters))


def _describe_values(values: str | Iterable[str]) -> str:
    return values if isinstance(values, str) else "|".join(sorted(values))


def _where_predicate(where: Mapping[str, str | Iterable[str]], suite_name: str) -> RowPredicate:
    allowed = {
        column: frozenset([v]) if isinstance(v, str) else frozenset(v)
        for column, v in where.items()
    }

    def predicate(row: PromptRow) -> bool:
        for column, values in allowed.items():
            if column not in row.attributes:
                raise SuiteError(
                    f"Suite {suite_name!r} has no attribute column {column!r} to filter on; "
                    f"the attribute columns are {sorted(row.attributes)}.",
                    column=column,
                )
            if row.attributes[column] not in values:
                return False
        return True

    return predicate


@dataclass(frozen=True)
class SuiteInfo:
    """One line of ``safebench list suites``."""

    name: str
    rows: int | None
    """Row count; None when the file of a suite without a documented count is missing."""
    concept: str
    prompt_column: str
    seed_rule: str
    guidance_rule: str
    source: str
    description: str
