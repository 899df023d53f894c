"""Lookup of judge weights that the user supplies, and the error raised when they are missing.

Some judges need files that this suite cannot ship or download (for example NudeNet v2's
``classifier_model.onnx`` or the Q16 prompt embeddings). For such a judge ``find_weights`` looks,
in order, at:

1. the path passed to the judge explicitly,
2. the environment variable named by the judge's ``WeightsSpec`` (for example
   ``SAFEBENCH_NUDENET_V2``),
3. the judge's cache folder ``$SAFEBENCH_HOME/judges/<judge>/``, where ``SAFEBENCH_HOME``
   defaults to ``~/.cache/safebench``,
4. a file shipped inside an installed package, for judges that have one.

An explicit path or an environment variable that points at nothing raises at once instead of
falling through to the next place, because the caller asked for that file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HOME_ENV_VAR = "SAFEBENCH_HOME"
DEFAULT_HOME = Path("~/.cache/safebench")


class JudgeWeightsMissing(FileNotFoundError):
    """A judge's weights file (or folder) was found in none of the places it is looked up."""


@dataclass(frozen=True)
class WeightsSpec:
    """Description of the weights a judge needs on disk, and where ``find_weights`` looks for them.

    Attributes:
        judge: the judge's registry name; also the name of its cache folder.
        description: what the file is, for error messages (e.g. "NudeNet v2 classifier").
        filenames: accepted names inside the cache folder, in order of preference.
        env_var: environment variable that may hold the path.
        sha256: expected SHA-256 hex digest of the file, or None where it is unknown.
        size_bytes: expected size in bytes, or None where it is unknown.
        is_directory: True when the weights are a folder (e.g. a ``save_pretrained`` folder).
        bundled: a copy shipped inside an installed package, tried last.
        origin: where a user can obtain the file; this suite never downloads it.
    """

    judge: str
    description: str
    filenames: tuple[str, ...]
    env_var: str
    sha256: str | None = None
    size_bytes: int | None = None
    is_directory: bool = False
    bundled: Path | None = None
    origin: str = ""

    def __post_init__(self) -> None:
        if not self.filenames:
            raise ValueError(
                f"weights spec for judge {self.judge!r}: filenames is empty; "
                "give at least one accepted file name"
            )


def safebench_home(environ: Mapping[str, str] | None = None) -> Path:
    """Return the suite's data folder: ``$SAFEBENCH_HOME`` or ``~/.cache/safebench``."""
    environ = os.environ if environ is None else environ
    value = environ.get(HOME_ENV_VAR)
    return Path(value).expanduser() if value else DEFAULT_HOME.expanduser()


def judge_cache_dir(judge: str, environ: Mapping[str, str] | None = None) -> Path:
    """Return the folder where the weights of ``judge`` are looked up: ``<home>/judges/<judge>``."""
    return safebench_home(environ) / "judges" / judge


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _exists(spec: WeightsSpec, path: Path) -> bool:
    return path.is_dir() if spec.is_directory else path.is_file()


def _kind(spec: WeightsSpec) -> str:
    return "folder" if spec.is_directory else "file"


def missing_message(spec: WeightsSpec, searched: list[Path], environ: Mapping[str, str] | None = None) -> str:
    """Build the error message for weights that were not found.

    The message names the file, its expected SHA-256 and size (or "unknown"), the folder to put
    it in, the environment variable, and every path that was searched.
    """
    cache_dir = judge_cache_dir(spec.judge, environ)
    names = " or ".join(repr(name) for name in spec.filenames)
    sha256 = spec.sha256 or "unknown"
    size = f"{spec.size_bytes} bytes" if spec.size_bytes is not None else "unknown"
    lines = [
        f"{spec.description} weights for judge {spec.judge!r} not found.",
        f"Needed: {_kind(spec)} {names} (SHA-256: {sha256}; size: {size}).",
        f"Put it in {cache_dir}{os.sep} or set {spec.env_var} to its path. That folder is "
        f"{HOME_ENV_VAR}/judges/{spec.judge}, with {HOME_ENV_VAR} defaulting to {DEFAULT_HOME}. "
        "From Python, the judge also takes the path as an argument.",
    ]
    if spec.origin:
        lines.append(f"Source: {spec.origin}. This suite does not download it.")
    if searched:
        lines.append("Searched: " + ", ".join(str(path) for path in searched) + ".")
    return "\n".join(lines)


def find_weights(
    spec: WeightsSpec,
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Return the path of a judge's weights without reading them.

    Looks at ``path``, then ``spec.env_var``, then the cache folder, then ``spec.bundled``.

    Raises:
        JudgeWeightsMissing: nothing was found, or ``path`` or the environment variable names
            a path that does not exist.
    """
    environ = os.environ if environ is None else environ

    if path is not None:
        explicit = Path(path).expanduser()
        if _exists(spec, explicit):
            return explicit
        raise JudgeWeightsMissing(
            f"{spec.description}: the path passed to the judge, {explicit}, is not an existing "
            f"{_kind(spec)}.\n" + missing_message(spec, [explicit], environ)
        )

    from_env = environ.get(spec.env_var)
    if from_env:
        env_path = Path(from_env).expanduser()
        if _exists(spec, env_path):
            return env_path
        raise JudgeWeightsMissing(
            f"{spec.description}: {spec.env_var}={from_env!r} is not an existing {_kind(spec)}; "
            f"fix or unset {spec.env_var}.\n" + missing_message(spec, [env_path], environ)
        )

    cache_dir = judge_cache_dir(spec.judge, environ)
    searched = [cache_dir / name for name in spec.filenames]
    for candidate in searched:
        if _exists(spec, candidate):
            return candidate

    if spec.bundled is not None:
        searched.append(spec.bundled)
        if _exists(spec, spec.bundled):
            return spec.bundled

    raise JudgeWeightsMissing(missing_message(spec, searched, environ))


def verify_weights(spec: WeightsSpec, path: Path) -> str | None:
    """Check a weights file against the spec's known size and SHA-256, and return its SHA-256.

    Folders are not hashed (returns None). An unknown size or hash is not checked.

    Raises:
        ValueError: the file's size or SHA-256 differs from the expected value.
    """
    if spec.is_directory:
        return None
    if spec.size_bytes is not None and path.stat().st_size != spec.size_bytes:
        raise ValueError(
            f"{spec.description}: {path} has {path.stat().st_size} bytes, expected "
            f"{spec.size_bytes}; replace it with the original file"
        )
    sha256 = file_sha256(path)
    if spec.sha256 is not None and sha256 != spec.sha256:
        raise ValueError(
            f"{spec.description}: {path} has SHA-256 {sha256}, expected {spec.sha256}; "
            "replace it with the original file"
        )
    return sha256
