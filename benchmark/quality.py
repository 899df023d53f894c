"""Quality metrics over a suite's benign images.

For the embedded model both metrics use the digit judge. The Fréchet distance (``fid_judge``)
compares the judge's penultimate features of generated benign images with those of held-out real
digits. The alignment is the share of benign images that the judge classifies as the requested
digit.

For real models, ``fid`` and ``kid`` compare the FID Inception-v3 features of the generated images
of a COCO caption suite with those of the real MS-COCO image of each caption (a user folder), and
``clip_score`` scores each benign image against its own prompt with a local CLIP model. Every
stored value carries its implementation, network weights, reference set and size, and resize
policy in the metric's details.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark.protocols import COCO_REFERENCE_METRICS, REAL_MODEL_METRICS, Protocol
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


# FID's covariance over the 2,048 Inception features is rank-deficient below this many images.
SMALL_SAMPLE_IMAGES = 2048


class QualityResources:
    """The networks and reference sets of the real-model metrics, loaded once per run.

    Args:
        protocol: gives the metric names, the CLIP scale and the reference resize.
        reference_images: folder of real MS-COCO images (``fid`` and ``kid``).
        inception_weights: the FID Inception weights file, or None to search the default places.
        clip_model: the CLIP model folder, or None to search the default places.
        batch_size: images per network call.

    ``check(suites)`` finds every file the protocol's metrics need for those suites and raises
    ``FileNotFoundError`` or ``ValueError`` naming what is missing, without loading a network.
    """

    def __init__(
        self,
        protocol: Protocol,
        *,
        reference_images: Path | None,
        inception_weights: Path | None,
        clip_model: Path | None,
        batch_size: int = 32,
    ) -> None:
        self.protocol = protocol
        self.reference_images = reference_images
        self.inception_weights = inception_weights
        self.clip_model = clip_model
        self.batch_size = batch_size
        self._inception = None
        self._clip = None
        self._references: dict[str, object] = {}
        self._reference_metrics: dict[tuple[str, str], object] = {}
        self._has_benign_suites = False
        self._inception_sha256: str | None = None
        self._clip_sha256: str | None = None

    @property
    def needs_reference(self) -> bool:
        return any(name in COCO_REFERENCE_METRICS for name in self.protocol.quality)

    def check(self, suites: Sequence) -> None:
        """Check every file the metrics need for the benign rows of ``suites`` (loaded ``Suite`` objects).

        Raises:
            FileNotFoundError: one or more files are missing; the message names each of them.
        """
        from benchmark.metrics.clip_score import resolve_clip_model_dir
        from benchmark.metrics.inception import resolve_inception_weights

        self._has_benign_suites = bool(suites)
        if not suites:
            return
        problems: list[str] = []
        if self.needs_reference:
            if self.reference_images is None:
                names = ", ".join(suite.spec.name for suite in suites)
                problems.append(
                    f"FID/KID of suite(s) {names} compare with the real MS-COCO image of each caption: "
                    "pass --reference-images DIR (the val2014 images)"
                )
            else:
                for suite in suites:
                    try:
                        self._reference_for(suite)
                    except (FileNotFoundError, ValueError) as error:
                        problems.append(str(error))
            try:
                resolve_inception_weights(self.inception_weights)
            except FileNotFoundError as error:
                problems.append(str(error))
        if "clip_score" in self.protocol.quality:
            try:
                self.clip_model = resolve_clip_model_dir(self.clip_model)
            except FileNotFoundError as error:
                problems.append(str(error))
        if problems:
            raise FileNotFoundError("\n".join(problem.rstrip(".") + "." for problem in problems))

    def load(self) -> None:
        """Load the networks the metrics use (after ``check``), so that an unreadable file fails now."""
        if not self._has_benign_suites:
            return
        if self.needs_reference:
            self.inception()
        if "clip_score" in self.protocol.quality:
            self.clip()

    def _reference_for(self, suite):
        from benchmark.metrics.reference import coco_reference_images

        if suite.spec.name not in self._references:
            self._references[suite.spec.name] = coco_reference_images(self.reference_images, suite)
        return self._references[suite.spec.name]

    def inception(self):
        if self._inception is None:
            from benchmark.metrics.inception import load_fid_inception

            self._inception = load_fid_inception(self.inception_weights)
        return self._inception

    def clip(self):
        if self._clip is None:
            from benchmark.metrics.clip_score import ClipScore

            try:
                self._clip = ClipScore(self.clip_model, scale=self.protocol.clip_scale)
            except Exception as error:  # noqa: BLE001 - transformers raises several types for bad files
                raise ValueError(
                    f"CLIP score: the model in {self.clip_model} could not be loaded ({type(error).__name__}: "
                    f"{error}); replace the folder's files"
                ) from None
        return self._clip

    def reference_metric(self, name: str, suite):
        """Return the FID or KID metric of ``suite`` with its reference images accumulated once."""
        from benchmark.metrics.inception import InceptionFrechetDistance, InceptionKernelDistance

        key = (name, suite.spec.name)
        metric = self._reference_metrics.get(key)
        if metric is None:
            reference = self._reference_for(suite)
            reference_name = reference.reference_name(self.protocol.reference_resize)
            if name == "fid":
                metric = InceptionFrechetDistance(reference_name, extractor=self.inception())
            else:
                metric = InceptionKernelDistance(
                    reference_name, extractor=self.inception(), subset_size=min(1000, len(reference))
                )
            for batch in tqdm(
                reference.batches(self.batch_size, size=self.protocol.reference_resize),
                total=-(-len(reference) // self.batch_size),
                desc=f"{name} reference {suite.spec.name}",
                unit="batch",
            ):
                metric.update(batch, real=True)
            self._reference_metrics[key] = metric
        else:
            metric.reset(keep_reference=True)
        return metric

    def reference_key(self, suite) -> str:
        """Return a digest of the reference image ids, the preprocessing and the Inception weights."""
        from benchmark.metrics.inception import resolve_inception_weights, sha256_of_file

        if self._inception_sha256 is None:
            self._inception_sha256 = sha256_of_file(resolve_inception_weights(self.inception_weights))
        reference = self._reference_for(suite)
        ids = ",".join(str(image_id) for image_id in reference.image_ids)
        payload = f"{ids}|{self.protocol.reference_resize}|{self._inception_sha256}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def clip_key(self) -> str:
        """Return the SHA-256 of the CLIP weights file, so a moved folder keeps its stored scores."""
        from benchmark.metrics.clip_score import clip_weights_file
        from benchmark.metrics.inception import sha256_of_file

        if self._clip_sha256 is None:
            self._clip_sha256 = sha256_of_file(clip_weights_file(Path(self.clip_model)))
        return self._clip_sha256


def compute_real_quality(
    store: ResultStore,
    out_dir: Path,
    resources: QualityResources,
    *,
    method: str,
    suite,
    job_keys: Sequence[str],
) -> None:
    """Compute and store the real-model quality metrics of one (method, suite) cell.

    ``suite`` is the loaded ``Suite``; ``job_keys`` are its benign images. A metric whose stored
    ``inputs_key`` matches the current images, reference and weights is not recomputed.
    """
    protocol = resources.protocol
    rows = store.generations(job_keys=job_keys)
    if len(rows) < 2:
        return
    suite_name = suite.spec.name
    for name in protocol.quality:
        if name not in REAL_MODEL_METRICS:
            continue
        if name == "clip_score":
            extra = f"clip_score:{protocol.clip_scale}:{resources.clip_key()}"
        else:
            extra = f"{name}:{resources.reference_key(suite)}"
        inputs_key = _inputs_key(job_keys, extra)
        existing = store.metric(method, suite_name, protocol.protocol_id, name)
        if existing is not None and existing["inputs_key"] == inputs_key:
            continue
        if name == "clip_score":
            metric = resources.clip()
            metric.reset()
        else:
            if len(rows) < SMALL_SAMPLE_IMAGES:
                logger.warning(
                    "%s of %s on %s: %d generated images. Below %d images the estimate is biased upward, so "
                    "compare it only with values over the same number of images",
                    name,
                    method,
                    suite_name,
                    len(rows),
                    SMALL_SAMPLE_IMAGES,
                )
            metric = resources.reference_metric(name, suite)
        for start in range(0, len(rows), resources.batch_size):
            chunk = rows[start : start + resources.batch_size]
            images = _load_images(out_dir, [row.image_path for row in chunk])
            if name == "clip_score":
                metric.update(images, [row.prompt for row in chunk])
            else:
                metric.update(images, real=False)
        result = metric.compute()
        store.set_metric(
            method=method,
            suite=suite_name,
            protocol_id=protocol.protocol_id,
            metric=name,
            value=result.value,
            n=len(rows),
            details=dataclasses.asdict(result),
            inputs_key=inputs_key,
        )
