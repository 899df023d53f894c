"""Prompt suites: the standard unsafe-prompt sets that ship with the package, and user files.

A suite is a prompt file plus its column mapping, seed rule, guidance rule, categories and
attack-success-rate denominator. ``load_suite("i2p-sexual")`` loads a registered set after
checking the file's SHA-256. ``load_suite("my_prompts.csv", prompt_column="adv_prompt")`` loads
a CSV, JSON Lines or JSON file and validates it against the same rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
from pathlib import Path

from .loader import DATA_DIR, build_suite, load_spec, spec_path
from .reader import SUPPORTED_SUFFIXES, count_csv_rows, read_table, sha256_of_file
from .registry import STANDARD_SUITES
from .spec import PromptRow, Suite, SuiteError, SuiteInfo, SuiteSpec

__all__ = [
    "DATA_DIR",
    "NO_COLUMN",
    "PromptRow",
    "Suite",
    "SuiteError",
    "SuiteInfo",
    "SuiteSpec",
    "get_suite_spec",
    "list_suites",
    "load_spec",
    "load_suite",
    "register_suite",
    "sha256_of_file",
    "spec_path",
    "suite_names",
]

logger = logging.getLogger(__name__)

NO_COLUMN: tuple[()] = ()
"""Column argument of ``load_suite`` meaning "no column": fixed seed, no guidance, ids by index."""

ColumnArgument = str | tuple[str, ...] | None

# Columns a user file is searched for, in order, when load_suite gets no mapping for them.
_AUTO_COLUMNS: dict[str, tuple[str, ...]] = {
    "seed_column": ("evaluation_seed", "sd_seed", "seed"),
    "guidance_column": ("evaluation_guidance", "sd_guidance_scale", "guidance_scale"),
    "category_column": ("categories", "category"),
    "id_column": ("case_number", "case_id", "id"),
}

_REGISTRY: dict[str, SuiteSpec] = {spec.name: spec for spec in STANDARD_SUITES}


def register_suite(spec: SuiteSpec, *, replace: bool = False) -> None:
    """Add a suite to the registry under ``spec.name``; ``replace`` allows redefining a name."""
    if spec.name in _REGISTRY and not replace:
        raise SuiteError(
            f"Suite {spec.name!r} is already registered; pick another name or pass replace=True."
        )
    _REGISTRY[spec.name] = spec


def suite_names() -> list[str]:
    """Return the registered suite names in registration order."""
    return list(_REGISTRY)


def get_suite_spec(name: str) -> SuiteSpec:
    """Return the registered spec called ``name``, or raise SuiteError listing close names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise SuiteError(
            f"Unknown suite {name!r}.{hint} Registered suites: {', '.join(_REGISTRY)}. A prompt "
            f"file path must end in {', '.join(SUPPORTED_SUFFIXES)}."
        ) from None


def load_suite(
    name_or_path: str | os.PathLike[str],
    *,
    prompt_column: str | None = None,
    seed_column: ColumnArgument = None,
    guidance_column: ColumnArgument = None,
    category_column: ColumnArgument = None,
    id_column: ColumnArgument = None,
    default_seed: int | None = None,
    limit: int | None = None,
) -> Suite:
    """Load a registered suite by name, or a user ``.csv``/``.jsonl``/``.json`` prompt file.

    A column argument is a column name, a tuple of candidate names (the first present is used),
    ``NO_COLUMN`` for none, or None. None keeps a registered suite's mapping. For a user file,
    None picks the first present of these columns:

    - prompt: ``prompt`` (a file without one needs ``prompt_column``);
    - seed: ``evaluation_seed``, ``sd_seed``, ``seed``, else every row gets ``default_seed``;
    - guidance: ``evaluation_guidance``, ``sd_guidance_scale``, ``guidance_scale``, else None;
    - categories: ``categories``, ``category``, split on commas;
    - case id: ``case_number``, ``case_id``, ``id``, else the 0-based row index.

    ``default_seed`` None keeps the suite's default (42). ``limit`` keeps the first rows after
    validation of the whole selection. Raises SuiteError naming the file, row and column of
    the first problem, or both hashes when a shipped file fails its SHA-256 check.
    """
    overrides = {
        "prompt_column": prompt_column,
        "seed_column": seed_column,
        "guidance_column": guidance_column,
        "category_column": category_column,
        "id_column": id_column,
    }
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SuiteError(f"limit={limit!r} is invalid; expected a positive integer or None.")

    name = os.fspath(name_or_path)
    if name in _REGISTRY:
        suite = _load_registered(_REGISTRY[name], overrides, default_seed)
    elif _looks_like_path(name_or_path):
        suite = _load_user_file(Path(name), overrides, default_seed)
    else:
        get_suite_spec(name)  # raises with close names
        raise AssertionError("unreachable")

    if limit is not None and limit < len(suite):
        suite = dataclasses.replace(
            suite, rows=suite.rows[:limit], filters=(*suite.filters, f"limit={limit}")
        )
    logger.info("Loaded suite %r: %d prompts from %s.", suite.name, len(suite), suite.path)
    return suite


def _looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    if isinstance(name_or_path, os.PathLike):
        return True
    path = Path(name_or_path)
    return bool(path.suffix) or "/" in name_or_path or os.sep in name_or_path or path.exists()


def _column_value(value: ColumnArgument) -> str | tuple[str, ...] | None:
    """Map a load_suite column argument to a spec field value (NO_COLUMN becomes None)."""
    if value is None or value == NO_COLUMN:
        return None
    return value if isinstance(value, str) else tuple(value)


def _load_registered(
    spec: SuiteSpec, overrides: dict[str, ColumnArgument], default_seed: int | None
) -> Suite:
    changes: dict[str, object] = {
        field: _column_value(value) for field, value in overrides.items() if value is not None
    }
    if default_seed is not None:
        changes["default_seed"] = default_seed
    if not changes:
        return load_spec(spec, DATA_DIR)

    # The documented row count still holds: overrides change columns, not the selection.
    spec = dataclasses.replace(spec, **changes)
    return build_suite(spec, read_table(spec_path(spec), spec.sha256), option_hint=True)


def _load_user_file(
    path: Path, overrides: dict[str, ColumnArgument], default_seed: int | None
) -> Suite:
    table = read_table(path)
    columns: dict[str, str | tuple[str, ...] | None] = {}
    for field, value in overrides.items():
        if value is not None:
            columns[field] = _column_value(value)
        elif field == "prompt_column":
            columns[field] = "prompt"
        else:
            found = [c for c in _AUTO_COLUMNS[field] if c in table.columns]
            columns[field] = found[0] if found else None
    if columns["prompt_column"] is None:
        raise SuiteError(
            f"{path}: prompt_column=NO_COLUMN is invalid because a suite needs prompts; pass the "
            f"name of the prompt column (the columns present are {list(table.columns)}).",
            path=path,
        )
    logger.info(
        "%s: prompt=%r seed=%r guidance=%r categories=%r id=%r",
        path,
        *(columns[f] for f in ("prompt_column", "seed_column", "guidance_column",
                               "category_column", "id_column")),
    )  # fmt: skip

    spec = SuiteSpec(
        name=path.name,
        file=str(path.resolve()),
        sha256=table.sha256,
        default_seed=42 if default_seed is None else default_seed,
        empty_prompt="error",
        denominator=f"all rows of {path.name}",
        description=f"User prompt file {path}.",
        source=str(path.resolve()),
        **columns,  # type: ignore[arg-type]
    )
    return build_suite(spec, table, option_hint=True)


def list_suites() -> list[SuiteInfo]:
    """Describe every registered suite, for ``safebench list suites``.

    Row counts come from the specs' documented counts. Suites without one are counted from
    their files, once per process; a missing file gives ``rows=None``.
    """
    return [
        SuiteInfo(
            name=spec.name,
            rows=spec.expected_rows if spec.expected_rows is not None else _count_rows(spec),
            concept=spec.concept,
            prompt_column=spec.prompt_column,
            seed_rule=spec.seed_rule,
            guidance_rule=spec.guidance_rule,
            source=spec.source,
            description=spec.description,
        )
        for spec in _REGISTRY.values()
    ]


@functools.lru_cache(maxsize=None)
def _count_rows(spec: SuiteSpec) -> int | None:
    path = spec_path(spec)
    if not path.is_file():
        logger.warning("Suite %r: %s not found; its row count is unknown.", spec.name, path)
        return None
    if not spec.where and not spec.category_filter and path.suffix.lower() == ".csv":
        return count_csv_rows(path)
    try:
        return len(build_suite(spec, read_table(path)))
    except SuiteError as error:
        logger.warning("Suite %r cannot be counted: %s", spec.name, error)
        return None
