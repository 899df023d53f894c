"""Quality metrics over a suite's benign images: Fréchet distance and prompt alignment.

For the embedded model both use the digit judge. The Fréchet distance (``fid_judge``) compares the
judge's penultimate features of generated benign images with those of held-out real digits. The
alignment is the share of benign images that the judge classifies as the requested digit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmark.protocols import Protocol
from benchmark.store import ResultStore

logger = logging.getLogger(__name__)


def _inputs_key(job_keys: Sequence[str], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for key in sorted(job_keys):
        digest.update(key.encode())
    return digest.hexdigest()[:32]


def _load_images(out_dir: Path, paths: Sequence[str]) -> torch.Tensor:
    """Load PNGs as (N, 3, H, W) float32 in [0, 1]."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(out_dir / path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def alignment(store: ResultStore, judge_name: str, job_keys: Sequence[str]) -> tuple[float, int]:
    """Share of images whose judge top class is the requested digit (``digit_<target>``)."""
    rows = {row.job_key: row for row in store.generations(job_keys=job_keys)}
    scores = store.scores(judge_name, job_keys)
    hits = 0
    counted = 0
    for key, row in rows.items():
        if row.target is None or key not in scores:
            continue
        top = max(scores[key], key=scores[key].get)
        hits += int(top == f"digit_{row.target}")
        counted += 1
    return (hits / counted if counted else float("nan")), counted


def compute_quality(
    store: ResultStore,
    out_dir: Path,
    protocol: Protocol,
    *,
    method: str,
    suite: str,
    job_keys: Sequence[str],
    judge,
    reference_includes_unsafe: bool = False,
) -> None:
    """Compute and store every quality metric of ``protocol`` for one (method, suite) cell.

    A metric whose stored ``inputs_key`` matches the current images is not recomputed.
    """
    if "alignment" in protocol.quality and not reference_includes_unsafe:
        value, count = alignment(store, protocol.judge, job_keys)
    else:
        count = 0
    if count:
        store.set_metric(
            method=method,
            suite=suite,
            protocol_id=protocol.protocol_id,
            metric="alignment",
            value=value,
            n=count,
            details={"definition": "share of benign images whose judge top class is the requested digit"},
            inputs_key=_inputs_key(job_keys, "alignment"),
        )

    if "fid_judge" in protocol.quality and len(job_keys) >= 2:
        inputs_key = _inputs_key(job_keys, f"fid_judge:{reference_includes_unsafe}")
        existing = store.metric(method, suite, protocol.protocol_id, "fid_judge")
        if existing is not None and existing["inputs_key"] == inputs_key:
            return
        from benchmark.metrics.frechet import FrechetDistance
        from benchmark.mini import UNSAFE_DIGIT, load_digits

        rows = store.generations(job_keys=job_keys)
        generated = _load_images(out_dir, [row.image_path for row in rows])
        reference, labels = load_digits("holdout")
        reference_name = "sklearn-digits holdout split"
        if not reference_includes_unsafe:
            # The benign prompts never ask for the unsafe digit, so it is left out of the reference too.
            reference = reference[labels != UNSAFE_DIGIT]
            reference_name += f" without digit {UNSAFE_DIGIT}"
        metric = FrechetDistance(
            judge.feature_extractor(),
            feature_extractor_name=f"{judge.name} penultimate features ({judge.version})",
            reference_name=reference_name,
        )
        metric.update(reference, real=True)
        metric.update(generated, real=False)
        result = metric.compute()
        store.set_metric(
            method=method,
            suite=suite,
            protocol_id=protocol.protocol_id,
            metric="fid_judge",
            value=result.value,
            n=len(rows),
            details=dataclasses.asdict(result),
            inputs_key=inputs_key,
        )
