"""The generation runner: plan, validate, generate, score and measure, resumably.

A run is (model × methods × suites) under one protocol. Each image is a job keyed by everything that
determines it: model, method settings, suite file hash, protocol generation fields, row, image
index and seed. A rerun of the same command therefore skips every finished image, and a new method
added to an old output directory reuses the images of the methods already there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import platform
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmark.concepts import CONCEPTS, NO_CONCEPT, Concept, get_concept
from benchmark.generation import MethodRuntime
from benchmark.methods import DEFAULT_METHODS, MethodSpec, get_method
from benchmark.models import (
    EMBEDDED_MODELS,
    PROMPTLESS_MODELS,
    LoadedModel,
    ModelLoadError,
    check_model_reference,
    load_model,
    resolve_device,
)
from benchmark.protocols import JUDGE_METRICS, REAL_MODEL_METRICS, Protocol, get_protocol
from benchmark.store import GenerationRow, ResultStore

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path("results") / "mini"

# The suite concept of the embedded prompt sets, which only the embedded model can answer.
EMBEDDED_SUITE_CONCEPT = "embedded unsafe digit"


class RunPlanError(ValueError):
    """The run plan is invalid; raised before any image is generated."""


@dataclass(frozen=True)
class RunConfig:
    """Run configuration; every field is recorded with the run and hashed into its id."""

    model: str = "mini"
    suites: tuple[str, ...] = ("mini",)
    # Registry names, or MethodSpec objects for settings outside the registry (tuning sweeps).
    methods: tuple[str | MethodSpec, ...] = DEFAULT_METHODS
    # A preset name, or a Protocol object (tests use short ones).
    protocol: str | Protocol = "mini"
    concept: str | None = None
    out_dir: Path = DEFAULT_OUT_DIR
    batch_size: int = 32
    limit: int | None = None
    model_config: str | None = None
    # A folder of unwanted images for the safe denoiser's negation set (required for real models).
    negation_images: Path | None = None
    # Replacement UNets of unlearning methods by method weights name, e.g. {"esd-u": Path(...)}.
    weights: tuple[tuple[str, Path], ...] = ()
    # A user-given negative prompt in place of the concept's preset (methods built on neg-prompt).
    negative_prompt: str | None = None
    # Column mapping of user prompt files (registered suites keep their own).
    prompt_column: str | None = None
    seed_column: str | None = None
    category_column: str | None = None
    # Real-model quality metrics: the MS-COCO image folder (fid, kid), the FID Inception weights
    # file and the CLIP model folder (None: their environment variables, then the cache folder).
    reference_images: Path | None = None
    inception_weights: Path | None = None
    clip_model: Path | None = None
    # Skip the protocol's quality metrics (the leaderboard shows none).
    skip_quality: bool = False
    # Torch device of real models; None picks the GPU of this process when there is one, else the CPU.
    device: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise RunPlanError(f"batch_size must be >= 1, got {self.batch_size}; pass --batch-size 1 or more")
        if self.limit is not None and self.limit < 1:
            raise RunPlanError(f"limit must be >= 1, got {self.limit}; omit --limit to run every row")
        if not self.methods:
            raise RunPlanError("no methods given; pass at least one --method")
        if not self.suites:
            raise RunPlanError("no suites given; pass at least one --suite")


@dataclass(frozen=True)
class Job:
    job_key: str
    method: MethodSpec
    suite_name: str
    suite_sha256: str
    row: Any  # benchmark.suites.PromptRow
    image_index: int
    seed: int
    guidance_scale: float
    role: str
    target: str | None


@dataclass
class RunSummary:
    run_id: str
    out_dir: Path
    protocol_id: str
    generated: int = 0
    skipped: int = 0
    scored: int = 0
    seconds: float = 0.0
    leaderboard_paths: list[Path] = field(default_factory=list)


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("safedenoise-bench")
    except PackageNotFoundError:
        package = "0+unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{package}+{commit}" if commit else package


def environment() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }


def _suite_role(suite: Any, row: Any) -> tuple[str, str | None]:
    """Return ("unsafe" | "benign", target) for a prompt row.

    Rows of the embedded suite state their category in a column. every row of a standard unsafe-prompt set is
    an attack prompt, and caption sets such as COCO (concept "benign") are benign.
    """
    target = dict(row.attributes).get("target_digit")
    if suite.spec.concept == "benign" or "benign" in tuple(row.categories):
        return "benign", target
    return "unsafe", target


def _uses_concept(method: MethodSpec) -> bool:
    """Return whether a method needs an unsafe concept (for its negative prompt, guidance, weights or negation set)."""
    return bool(method.negative_prompt or method.guidance_defense or method.weights or method.safe_denoiser)


def _job_key(model_id: str, method: MethodSpec, settings: dict, suite_sha: str, protocol: Protocol, row, image_index: int, seed: int, guidance: float) -> str:
    payload = {
        "model": model_id,
        "method": method.config_hash(),
        "settings": settings,
        "suite_sha256": suite_sha,
        "sampler": protocol.sampler,
        "steps": protocol.num_inference_steps,
        "resolution": protocol.resolution,
        "dtype": protocol.dtype,
        "row_index": row.index,
        "prompt": row.prompt,
        "image_index": image_index,
        "seed": seed,
        "guidance_scale": guidance,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Runner:
    """Executes a ``RunConfig``. Construct, then call ``run()``."""

    def __init__(
        self,
        config: RunConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        barrier: Callable[[], None] | None = None,
    ):
        """``rank`` of ``world_size`` processes generates every ``world_size``-th image; ``barrier``
        waits for all processes (for example accelerate's ``PartialState().wait_for_everyone``)."""
        self.config = config
        self.rank = rank
        self.world_size = world_size
        if world_size > 1 and barrier is None:
            raise ValueError(f"a run of {world_size} processes needs a barrier that waits for all of them")
        self._barrier = barrier or (lambda: None)
        if config.model in EMBEDDED_MODELS:
            # The embedded models run on the CPU, where their published numbers were measured.
            if config.device not in (None, "cpu"):
                logger.info("model %s is embedded and runs on the CPU; --device %s is ignored", config.model, config.device)
            self.device = torch.device("cpu")
        else:
            try:
                self.device = resolve_device(config.device, local_rank)
            except ModelLoadError as error:
                raise RunPlanError(str(error)) from None
        self.out_dir = Path(config.out_dir)
        self._reported_benign_skips: set[str] = set()
        self.protocol, self.methods, self.suites, self.concept = self._validate_plan()

    # Planning -----------------------------------------------------------------------------------

    def _validate_plan(self) -> tuple[Protocol, list[MethodSpec], list[Any], Concept]:
        """Resolve every name and reject incompatible combinations before anything runs."""
        from benchmark.judges import check_judge_available, get_rule
        from benchmark.suites import load_suite

        if isinstance(self.config.protocol, Protocol):
            protocol = self.config.protocol
        else:
            try:
                protocol = get_protocol(self.config.protocol)
            except KeyError as error:
                raise RunPlanError(str(error.args[0])) from None
        methods = []
        for name in self.config.methods:
            if isinstance(name, MethodSpec):
                methods.append(name)
                continue
            try:
                methods.append(get_method(name))
            except KeyError as error:
                raise RunPlanError(str(error.args[0])) from None
        if len({method.name for method in methods}) != len(methods):
            raise RunPlanError(f"methods repeat: {list(self.config.methods)}; give each method once")
        suites = []
        for name in self.config.suites:
            suite = load_suite(
                name,
                limit=self.config.limit,
                prompt_column=self.config.prompt_column,
                seed_column=self.config.seed_column,
                category_column=self.config.category_column,
            )
            if len(suite) == 0:
                raise RunPlanError(f"suite {name!r} has no rows")
            suites.append(suite)
        try:
            rule = get_rule(protocol.rule)
        except KeyError as error:
            raise RunPlanError(f"protocol {protocol.name!r}: {error.args[0]}") from None
        self.judge_names = tuple(dict.fromkeys((protocol.judge, *rule.judges)))
        # Missing judge and metric files are collected and reported together, before any image.
        missing_files = []
        for judge_name in self.judge_names:
            try:
                check_judge_available(judge_name)
            except FileNotFoundError as error:
                missing_files.append(f"protocol {protocol.name!r} needs judge {judge_name!r}: {error}")

        embedded_model = self.config.model in EMBEDDED_MODELS
        concept_name = self.config.concept or ("digit-7" if embedded_model else None)
        defended = [method.name for method in methods if _uses_concept(method)]
        if concept_name is None and defended:
            raise RunPlanError(
                f"model {self.config.model!r}: methods {defended} defend against an unsafe concept and this "
                f"model has no default; pass --concept (known: {sorted(CONCEPTS)})"
            )
        try:
            concept = get_concept(concept_name) if concept_name is not None else NO_CONCEPT
        except KeyError as error:
            raise RunPlanError(str(error.args[0])) from None

        if self.config.negation_images is not None and not Path(self.config.negation_images).is_dir():
            missing_files.append(
                f"negation image folder {self.config.negation_images} not found; pass an existing folder to --negation-images"
            )
        if (
            concept.needs_negation_images
            and self.config.negation_images is None
            and any(method.safe_denoiser for method in methods)
        ):
            missing_files.append(
                f"concept {concept.name!r} ships no negation images and the safe denoiser needs them: pass "
                "--negation-images DIR (a folder of unwanted images, e.g. generations of I2P 'sexual' prompts)"
            )
        known_weights = set(concept.unlearned_weights) | {name for name, _ in self.config.weights} | {"uce"}
        for method in methods:
            if method.weights is not None and method.weights not in known_weights:
                missing_files.append(
                    f"method {method.name!r} needs {method.weights!r} weights for concept {concept.name!r}; "
                    f"pass --weights {method.weights}=PATH (a UNet folder, .safetensors or state dict)"
                )
        for name, path in self.config.weights:
            if not Path(path).exists():
                missing_files.append(f"--weights {name}={path}: path not found")

        if self.config.model in PROMPTLESS_MODELS:
            for method in methods:
                if method.negative_prompt or method.guidance_defense or method.weights:
                    raise RunPlanError(
                        f"method {method.name!r} acts on the text prompt or the text-conditioned UNet, and model "
                        f"{self.config.model!r} takes no prompt; use sd, safe-denoiser or safe-denoiser-paper"
                    )
            expected_prefix = "mini-class" if self.config.model == "mini-class" else "mini-uncond"
            for suite in suites:
                if not suite.spec.name.startswith(expected_prefix):
                    raise RunPlanError(
                        f"suite {suite.spec.name!r} does not fit model {self.config.model!r}; use "
                        f"--suite {expected_prefix} (or {expected_prefix}-dev)"
                    )
        elif self.config.model == "mini":
            for suite in suites:
                if suite.spec.name.startswith(("mini-class", "mini-uncond")):
                    raise RunPlanError(
                        f"suite {suite.spec.name!r} is for the model of the same name; pass --model "
                        f"{suite.spec.name.removesuffix('-dev')}"
                    )
        try:
            check_model_reference(self.config.model, self.config.model_config)
        except ModelLoadError as error:
            raise RunPlanError(str(error)) from None

        if embedded_model and protocol.name in EMBEDDED_MODELS and protocol.name != self.config.model:
            raise RunPlanError(
                f"protocol {protocol.name!r} is the preset of model {protocol.name!r}, not of "
                f"{self.config.model!r}; use --protocol {self.config.model}"
            )
        embedded_judge = protocol.judge == "mini-digit"
        if embedded_judge != embedded_model:
            raise RunPlanError(
                f"protocol {protocol.name!r} (judge {protocol.judge!r}) does not fit model "
                f"{self.config.model!r}: the embedded digit judge scores only the embedded 'mini' model, and "
                "real models need a real judge; use --protocol mini with --model mini"
            )
        for suite in suites:
            embedded_suite = suite.spec.concept == EMBEDDED_SUITE_CONCEPT
            real_suite = suite.spec.concept not in ("", EMBEDDED_SUITE_CONCEPT)
            if (embedded_suite and not embedded_model) or (real_suite and embedded_model):
                raise RunPlanError(
                    f"suite {suite.spec.name!r} (concept {suite.spec.concept!r}) does not fit model "
                    f"{self.config.model!r}: the embedded suites 'mini' and 'mini-dev' go with --model mini, "
                    "the standard prompt sets with real models; a user file goes with either"
                )
            self._check_judge_coverage(protocol, suite)
        try:
            self.quality_resources = self._check_quality(protocol, suites)
        except RunPlanError as error:
            missing_files.append(str(error))
        if missing_files:
            raise RunPlanError("\n\n".join(missing_files))
        # Every file exists: load the judges and metric networks now, so that a corrupt or wrong
        # file fails here and not after the images are generated.
        unreadable = []
        for judge_name in self.judge_names:
            try:
                self._judge(judge_name)
            except Exception as error:  # noqa: BLE001 - any load failure is reported as a plan error
                unreadable.append(
                    f"protocol {protocol.name!r}: judge {judge_name!r} could not be loaded from its weights "
                    f"({type(error).__name__}: {error}); replace the file named in that message"
                )
        if self.quality_resources is not None:
            try:
                self.quality_resources.load()
            except Exception as error:  # noqa: BLE001 - any load failure is reported as a plan error
                unreadable.append(
                    f"protocol {protocol.name!r} quality metrics: a network could not be loaded "
                    f"({type(error).__name__}: {str(error).rstrip('.')}). To run without quality metrics, pass --no-quality"
                )
        if unreadable:
            raise RunPlanError("\n\n".join(unreadable))
        return protocol, methods, suites, concept

    def _check_judge_coverage(self, protocol: Protocol, suite: Any) -> None:
        """Reject a suite whose unsafe concept the protocol's judges cannot flag; warn when they flag part of it."""
        from benchmark.judges.base import judge_coverage, judged_concepts

        coverage = judge_coverage(self.judge_names, suite.spec.concept)
        judged = sorted(judged_concepts(self.judge_names))
        if coverage == "none":
            raise RunPlanError(
                f"suite {suite.spec.name!r} is about {suite.spec.concept!r}, which the judge(s) "
                f"{list(self.judge_names)} of protocol {protocol.name!r} do not detect (they flag {judged}), so "
                "its ASR would be zero whatever the images show; use --protocol i2p, whose Q16 judge flags "
                "every I2P category"
            )
        if coverage == "partial":
            logger.warning(
                "suite %s covers %s, but judge(s) %s flag only %s: its ASR counts only those images",
                suite.spec.name,
                suite.spec.concept,
                list(self.judge_names),
                judged,
            )

    def _check_quality(self, protocol: Protocol, suites: list[Any]):
        """Find every file the protocol's real-model quality metrics need; None when there are none."""
        from benchmark.quality import QualityResources

        if self.config.skip_quality or not any(name in REAL_MODEL_METRICS for name in protocol.quality):
            return None
        benign_suites = []
        for suite in suites:
            rows = tuple(row for row in suite.rows if _suite_role(suite, row)[0] == "benign")
            if rows:
                benign_suites.append(dataclasses.replace(suite, rows=rows))
        if not benign_suites:
            logger.info(
                "protocol %s: no suite has benign rows, so its quality metrics (%s) are not computed; "
                "add a caption suite such as --suite coco-10k",
                protocol.name,
                ", ".join(protocol.quality),
            )
        resources = QualityResources(
            protocol,
            reference_images=self.config.reference_images,
            inception_weights=self.config.inception_weights,
            clip_model=self.config.clip_model,
            batch_size=self.config.batch_size,
        )
        try:
            resources.check(benign_suites)
        except (FileNotFoundError, ValueError) as error:
            raise RunPlanError(
                f"protocol {protocol.name!r} quality metrics ({', '.join(protocol.quality)}) need files:\n"
                f"{str(error).rstrip('.')}.\nTo run without quality metrics, pass --no-quality"
            ) from None
        self._benign_suites = {suite.spec.name: suite for suite in benign_suites}
        return resources

    def _jobs(self, model: LoadedModel, runtime: MethodRuntime, *, shard: bool = True) -> list[Job]:
        jobs = []
        settings = runtime.resolved_settings()
        computes_quality = bool(self.protocol.quality) and not self.config.skip_quality
        for suite in self.suites:
            skipped_benign = 0
            for row in suite.rows:
                role, target = _suite_role(suite, row)
                if role == "benign" and not computes_quality:
                    # Benign images only feed quality metrics; without them they would cost time for nothing.
                    skipped_benign += 1
                    continue
                guidance = self.protocol.guidance_scale
                if self.protocol.use_suite_guidance and row.guidance_scale is not None:
                    guidance = float(row.guidance_scale)
                for image_index in range(self.protocol.images_per_prompt):
                    seed = self.protocol.seed_for(row.seed, image_index)
                    key = _job_key(model.model_id, runtime.spec, settings, suite.sha256, self.protocol, row, image_index, seed, guidance)
                    jobs.append(
                        Job(key, runtime.spec, suite.spec.name, suite.sha256, row, image_index, seed, guidance, role, None if target is None else str(target))
                    )
            if skipped_benign and suite.spec.name not in self._reported_benign_skips:
                self._reported_benign_skips.add(suite.spec.name)
                logger.info(
                    "suite %s: %d benign rows not generated, because protocol %s computes no quality metric%s",
                    suite.spec.name,
                    skipped_benign,
                    self.protocol.name,
                    " (--no-quality)" if self.config.skip_quality else "",
                )
        return jobs[self.rank :: self.world_size] if shard else jobs

    def run_id(self, model_id: str) -> str:
        payload = {
            "config": {key: str(value) for key, value in asdict(self.config).items()},
            "protocol": self.protocol.to_dict(),
            "model_id": model_id,
            "code": code_version(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # Execution ----------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        start = time.perf_counter()
        model = load_model(
            self.config.model, dtype=self.protocol.dtype, config_folder=self.config.model_config, device=self.device
        )
        run_id = self.run_id(model.model_id)
        summary = RunSummary(run_id=run_id, out_dir=self.out_dir, protocol_id=self.protocol.protocol_id)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.world_size > 1 and self.rank != 0:
            # The first process creates the store (schema, WAL mode) before the others open it.
            self._barrier()
        with ResultStore(self.out_dir / "results.sqlite") as store:
            if self.world_size > 1 and self.rank == 0:
                self._barrier()
            store.begin_run(
                run_id,
                self.protocol.protocol_id,
                self.protocol.to_dict(),
                {key: str(value) for key, value in asdict(self.config).items()},
                code_version(),
                {**environment(), "device": str(self.device), "processes": self.world_size},
            )
            try:
                # Every method is built before any image is generated, so a bad setting in the last
                # method fails the run at once instead of after the others' images.
                runtimes = [self._build_runtime(method, model) for method in self.methods]
                for runtime in runtimes:
                    jobs = self._jobs(model, runtime)
                    generated, skipped = self._generate(store, run_id, model, runtime, jobs)
                    summary.generated += generated
                    summary.skipped += skipped
                    summary.scored += self._score(store, jobs)
                    if self.world_size == 1:
                        self._quality(store, runtime, jobs)
                if self.world_size > 1:
                    # Quality compares whole image sets, so one process computes it once all have finished.
                    self._barrier()
                    if self.rank == 0:
                        for runtime in runtimes:
                            self._quality(store, runtime, self._jobs(model, runtime, shard=False))
            except BaseException:
                store.finish_run(run_id, status="interrupted")
                raise
            if self.rank == 0:
                store.finish_run(run_id)
        summary.seconds = time.perf_counter() - start
        return summary

    def _build_runtime(self, method: MethodSpec, model: LoadedModel) -> MethodRuntime:
        """Bind a method to the model; an invalid setting raises ``RunPlanError`` before any image."""
        try:
            return MethodRuntime(
                method,
                model,
                self.concept,
                self.protocol,
                self.out_dir / "cache",
                negation_images=self.config.negation_images,
                weights=dict(self.config.weights),
                negative_prompt=self.config.negative_prompt,
            )
        except (ValueError, TypeError) as error:
            raise RunPlanError(f"method {method.name!r}: {error}") from error

    def _generate(self, store: ResultStore, run_id: str, model: LoadedModel, runtime: MethodRuntime, jobs: Sequence[Job]) -> tuple[int, int]:
        finished = store.finished_job_keys(job.job_key for job in jobs)
        pending = [job for job in jobs if job.job_key not in finished or not self._image_path(job).is_file()]
        skipped = len(jobs) - len(pending)
        if skipped:
            logger.info("method %s: %d of %d images already finished, skipped", runtime.spec.name, skipped, len(jobs))
        method_json = json.dumps({**runtime.spec.to_dict(), "resolved": runtime.resolved_settings()}, sort_keys=True, default=str)

        # The pipeline takes one guidance scale per call, so batches never mix guidance scales.
        by_guidance: dict[float, list[Job]] = defaultdict(list)
        for job in pending:
            by_guidance[job.guidance_scale].append(job)
        progress = tqdm(total=len(pending), desc=f"generate {runtime.spec.name}", unit="img", disable=not pending)
        for guidance, group in by_guidance.items():
            for start in range(0, len(group), self.config.batch_size):
                batch = group[start : start + self.config.batch_size]
                targets = [job.target for job in batch]
                class_labels = [int(target) for target in targets] if all(targets) else None
                output = runtime.generate(
                    [job.row.prompt for job in batch], [job.seed for job in batch], guidance, class_labels=class_labels
                )
                rows = []
                flat = 0
                for job, image, stats in zip(batch, output.images, output.stats):
                    if _is_flat(image):
                        # A single-colour image is what NaN latents decode to; judges see nothing unsafe in it.
                        stats = {**stats, "flat_image": True}
                        flat += 1
                    path = self._image_path(job)
                    digest = _save_image_atomically(image, path)
                    rows.append(
                        GenerationRow(
                            job_key=job.job_key,
                            run_id=run_id,
                            method=job.method.name,
                            method_json=method_json,
                            model_id=model.model_id,
                            suite=job.suite_name,
                            suite_sha256=job.suite_sha256,
                            protocol_id=self.protocol.protocol_id,
                            row_index=job.row.index,
                            case_id=str(job.row.case_id),
                            image_index=job.image_index,
                            prompt=job.row.prompt,
                            seed=job.seed,
                            guidance_scale=guidance,
                            role=job.role,
                            target=job.target,
                            attributes_json=json.dumps(dict(job.row.attributes), sort_keys=True, default=str),
                            image_path=str(path.relative_to(self.out_dir)),
                            image_sha256=digest,
                            seconds=output.seconds / len(batch),
                            stats_json=json.dumps(stats, sort_keys=True),
                            created_at=time.time(),
                        )
                    )
                if flat:
                    logger.warning(
                        "method %s: %d of %d images of this batch are a single flat colour, as NaN or "
                        "overflowing latents decode; check the method's settings",
                        runtime.spec.name,
                        flat,
                        len(batch),
                    )
                # Rows are written only after their images are on disk, so an interrupted batch
                # leaves no row pointing at a missing file.
                store.add_generations(rows)
                progress.update(len(batch))
        progress.close()
        return len(pending), skipped

    def _image_path(self, job: Job) -> Path:
        # Overridden methods carry brackets, dots and '=' in their names; folders keep a plain alphabet.
        safe_method = re.sub(r"[^A-Za-z0-9._-]", "_", job.method.name.replace("+", "_plus_"))
        return self.out_dir / "images" / safe_method / job.suite_name / f"{job.row.index:06d}_{job.image_index:02d}_{job.job_key[:8]}.png"

    def _score(self, store: ResultStore, jobs: Sequence[Job]) -> int:
        """Score unscored images with every judge the protocol's rule reads; return how many were new."""
        from PIL import Image

        keys = [job.job_key for job in jobs]
        newly_scored: set[str] = set()
        for judge_name in self.judge_names:
            unscored = sorted(set(keys) - store.scored_job_keys(judge_name, keys))
            if not unscored:
                continue
            judge = self._judge(judge_name)
            rows = {row.job_key: row for row in store.generations(job_keys=unscored)}
            batch_size = getattr(judge, "batch_size", 64)
            for start in range(0, len(unscored), batch_size):
                chunk = [key for key in unscored[start : start + batch_size] if key in rows]
                images = []
                for key in chunk:
                    with Image.open(self.out_dir / rows[key].image_path) as image:
                        images.append(image.convert("RGB"))
                store.add_scores(judge_name, judge.version, dict(zip(chunk, judge.score(images))))
            newly_scored.update(unscored)
        return len(newly_scored)

    def _judge(self, name: str | None = None):
        """Return the judge ``name`` (default: the protocol's), loaded once per runner."""
        from benchmark.judges import get_judge

        name = name or self.protocol.judge
        if not hasattr(self, "_judges"):
            self._judges: dict[str, Any] = {}
        if name not in self._judges:
            self._judges[name] = get_judge(name)
        return self._judges[name]

    def _quality(self, store: ResultStore, runtime: MethodRuntime, jobs: Sequence[Job]) -> None:
        """Compute the protocol's quality metrics over each suite's benign images."""
        from benchmark.quality import compute_quality, compute_real_quality

        if self.quality_resources is not None:
            for suite_name, suite in self._benign_suites.items():
                keys = [job.job_key for job in jobs if job.role == "benign" and job.suite_name == suite_name]
                compute_real_quality(
                    store, self.out_dir, self.quality_resources, method=runtime.spec.name, suite=suite, job_keys=keys
                )
        if self.config.skip_quality or not any(name in JUDGE_METRICS for name in self.protocol.quality):
            return

        by_suite: dict[str, list[Job]] = defaultdict(list)
        for job in jobs:
            if job.role == "benign":
                by_suite[job.suite_name].append(job)
        all_samples = set()
        if self.config.model == "mini-uncond":
            # Unconditional samples have no benign prompts: quality compares all samples with all
            # held-out digits, so removing the unsafe class shows up as a distribution shift.
            for job in jobs:
                by_suite[job.suite_name].append(job)
                all_samples.add(job.suite_name)
        for suite_name, suite_jobs in by_suite.items():
            compute_quality(
                store,
                self.out_dir,
                self.protocol,
                method=runtime.spec.name,
                suite=suite_name,
                job_keys=[job.job_key for job in suite_jobs],
                judge=self._judge(),
                reference_includes_unsafe=suite_name in all_samples,
            )


def _is_flat(image) -> bool:
    """Return whether every pixel of a PIL image has the same value in every channel."""
    extrema = image.getextrema()
    if isinstance(extrema[0], tuple):
        return all(low == high for low, high in extrema)
    return extrema[0] == extrema[1]


def _save_image_atomically(image, path: Path) -> str:
    """Write a PNG through a temporary file and a rename; return its SHA-256."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return hashlib.sha256(data).hexdigest()
