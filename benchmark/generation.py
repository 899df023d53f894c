"""Turning a method spec into images: one pipeline, its defenses applied through hooks.

No pipeline is copied per defense. A negative prompt goes through the pipeline's own argument; the
safe denoiser wraps the scheduler's ``step``; fine-tuned weights replace modules before generation.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark.concepts import Concept
from benchmark.methods import CONCEPT_NEGATIVE_PROMPT, MethodSpec
from benchmark.models import LoadedModel, make_scheduler
from benchmark.protocols import Protocol

logger = logging.getLogger(__name__)

# Offset between an image's sampling seed and the seed of the safe denoiser's re-noising stream,
# so the two random streams never coincide.
RENOISE_SEED_OFFSET = 7_919_000


@dataclass(frozen=True)
class BatchOutput:
    images: list  # PIL images
    seconds: float
    stats: list[dict[str, Any]]  # one dict per image


class MethodRuntime:
    """A method bound to a loaded model, a concept and a protocol, ready to generate batches."""

    def __init__(
        self,
        spec: MethodSpec,
        model: LoadedModel,
        concept: Concept,
        protocol: Protocol,
        cache_dir: Path,
        *,
        negation_images: Path | None = None,
        weights: dict[str, Path] | None = None,
        negative_prompt: str | None = None,
    ):
        self._user_negative_prompt = negative_prompt
        self.negation_images = negation_images
        self.weights = dict(concept.unlearned_weights) | dict(weights or {})
        self.spec = spec
        self.model = model
        self.concept = concept
        self.protocol = protocol
        self.pipeline = model.pipeline
        self._base_scheduler_config = dict(self.pipeline.scheduler.config)
        self.negative_prompt = self._resolve_negative_prompt()
        self.safe_denoiser = self._build_safe_denoiser(cache_dir) if spec.safe_denoiser else None
        self.guidance_defense = self._build_guidance_defense()
        self.unet, self._weights_record = self._build_unet()

    def _build_unet(self):
        """Return the replacement UNet of an unlearning method (or None) and its provenance."""
        if self.spec.weights is None:
            return None, None
        if self.spec.weights == "uce":
            from baselines.uce import uce_edit

            if not self.concept.uce_erase:
                raise ValueError(f"concept {self.concept.name!r} names no concepts for UCE to erase")
            unet = uce_edit(self.pipeline, erase=list(self.concept.uce_erase), guide="")
            return unet.eval(), {"uce_erase": list(self.concept.uce_erase), "guide": ""}
        from baselines.weights import load_replacement, replacement_provenance

        path = self.weights.get(self.spec.weights)
        if path is None:
            raise ValueError(
                f"method {self.spec.name!r}: no {self.spec.weights!r} weights for concept {self.concept.name!r} "
                f"(known: {sorted(self.weights)}); pass --weights {self.spec.weights}=PATH with a UNet folder or file"
            )
        unet = load_replacement(self.pipeline, path, component="unet")
        provenance = replacement_provenance(unet)
        return unet.eval(), {"path": str(path), "sha256": provenance.sha256}

    def _build_guidance_defense(self):
        if self.spec.guidance_defense is None:
            return None
        from baselines.guidance import get_guidance_defense

        overrides = {}
        if self.spec.guidance_defense.startswith("sld-"):
            # SLD's default safety text lists unsafe themes of photographs. The concept's own phrases
            # are what the defense must steer away from on a model trained on no such themes.
            overrides["safety_concept"] = self.concept.sld_safety_concept or ", ".join(self.concept.concept_prompts)
        overrides.update(dict(self.spec.guidance_params))
        return get_guidance_defense(self.spec.guidance_defense, self.concept.concept_prompts, **overrides)

    def _resolve_negative_prompt(self) -> str | None:
        if self.spec.negative_prompt == CONCEPT_NEGATIVE_PROMPT:
            return self._user_negative_prompt or self.concept.negative_prompt
        return self.spec.negative_prompt

    def resolved_settings(self) -> dict[str, Any]:
        """Everything that determines the images, for the stored method record."""
        settings: dict[str, Any] = {"negative_prompt": self.negative_prompt}
        if self._weights_record is not None:
            settings["weights"] = self._weights_record
        if self.guidance_defense is not None:
            settings["guidance_defense"] = {"name": self.guidance_defense.name, **self.guidance_defense.settings()}
        if self.safe_denoiser is not None:
            settings["safe_denoiser"] = {
                "form": self.spec.safe_denoiser,
                **self._safe_denoiser_params,
                "negation_bank": self._bank_provenance,
            }
        return settings

    def _build_safe_denoiser(self, cache_dir: Path):
        from safedenoise import PaperSafeDenoiser, ReferenceSafeDenoiser, calibrate_reference_gate

        form = self.spec.safe_denoiser
        denoiser_class = ReferenceSafeDenoiser if form == "reference" else PaperSafeDenoiser
        accepted = set(inspect.signature(denoiser_class).parameters) - {"bank"}
        accepted |= {"gate", "gate_margin"} if form == "reference" else set()
        unknown = sorted(set(dict(self.spec.safe_denoiser_params)) - accepted)
        if unknown:
            raise ValueError(
                f"method {self.spec.name!r}: unknown safe denoiser ({form} form) setting(s) {unknown}; "
                f"valid settings are {sorted(accepted)}"
            )
        settings = self.concept.safe_denoiser_settings_by_model.get(self.model.kind, self.concept.safe_denoiser_settings)
        params = dict(settings.get(form, self.concept.safe_denoiser_settings.get(form, {})))
        overrides = dict(self.spec.safe_denoiser_params)
        if "eta" in overrides:
            params.pop("log_eta", None)
        if "log_eta" in overrides:
            params.pop("eta", None)
        params.update(overrides)
        bank = self.concept.build_negation_bank(self.pipeline, cache_dir, self.negation_images)
        self._bank_provenance = dict(bank.provenance)
        if form == "reference":
            gate = params.pop("gate", None)
            if gate == "calibrated":
                scheduler = make_scheduler(self.protocol.sampler, self._base_scheduler_config)
                params["gate_threshold"] = calibrate_reference_gate(
                    bank,
                    scheduler,
                    self.protocol.num_inference_steps,
                    bandwidth=params["bandwidth"],
                    margin=params.pop("gate_margin", 1.6),
                )
            elif gate is not None:
                params["gate_threshold"] = float(gate)
            denoiser = ReferenceSafeDenoiser(bank, **params)
        else:
            if "log_eta" in params:
                params.setdefault("eta", None)
            denoiser = PaperSafeDenoiser(bank, **params)
        self._safe_denoiser_params = params
        # The gate calibration's per-timestep values stay in the stored settings, not in the log line.
        logged_params = {key: getattr(value, "threshold", value) for key, value in params.items()}
        logger.info("method %s: safe denoiser (%s form) with %s", self.spec.name, form, logged_params)
        return denoiser

    def generate(
        self, prompts: list[str], seeds: list[int], guidance_scale: float, class_labels: list[int] | None = None
    ) -> BatchOutput:
        """Generate one image per prompt; image i depends only on prompts[i] and seeds[i].

        The class-conditional model reads ``class_labels`` instead of prompts; the unconditional
        model reads neither.
        """
        from safedenoise import SafeDenoiserHook

        pipeline = self.pipeline
        pipeline.scheduler = make_scheduler(self.protocol.sampler, self._base_scheduler_config)
        if not hasattr(pipeline, "tokenizer"):
            return self._generate_latent_digits(seeds, guidance_scale, class_labels)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "num_inference_steps": self.protocol.num_inference_steps,
            "guidance_scale": guidance_scale,
            "generator": generators,
            "output_type": "pil",
        }
        if self.protocol.resolution is not None:
            kwargs["height"] = kwargs["width"] = self.protocol.resolution
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(prompts)

        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.unet is not None:
                stack.enter_context(_replaced_unet(pipeline, self.unet))
            if self.guidance_defense is not None:
                # The defense may replace prompts with embeddings, so its kwargs go last.
                kwargs.update(
                    stack.enter_context(
                        self.guidance_defense.applied(
                            pipeline,
                            prompts=prompts,
                            negative_prompts=kwargs.get("negative_prompt"),
                            guidance_scale=guidance_scale,
                            num_inference_steps=self.protocol.num_inference_steps,
                        )
                    )
                )
            hook = None
            if self.safe_denoiser is not None:
                renoise = [torch.Generator("cpu").manual_seed(seed + RENOISE_SEED_OFFSET) for seed in seeds]
                hook = SafeDenoiserHook(self.safe_denoiser, generator=renoise)
                stack.enter_context(hook.attached(pipeline.scheduler))
            images = pipeline(**kwargs).images
        stats = [{} for _ in prompts] if hook is None else _per_image_hook_stats(hook.records, len(prompts))
        seconds = time.perf_counter() - start
        return BatchOutput(images=images, seconds=seconds, stats=stats)


    def _generate_latent_digits(self, seeds: list[int], guidance_scale: float, class_labels: list[int] | None) -> BatchOutput:
        """Sample the class-conditional or unconditional miniature model through its own loop."""
        from safedenoise import SafeDenoiserHook

        from benchmark.mini.classcond import generate_class_conditional, generate_unconditional

        model = self.pipeline
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            hook = None
            if self.safe_denoiser is not None:
                renoise = [torch.Generator("cpu").manual_seed(seed + RENOISE_SEED_OFFSET) for seed in seeds]
                hook = SafeDenoiserHook(self.safe_denoiser, generator=renoise)
                stack.enter_context(hook.attached(model.scheduler))
            if model.conditional:
                if class_labels is None:
                    raise ValueError("the class-conditional model needs class labels (the suite's target_digit column)")
                images = generate_class_conditional(
                    model.unet, model.vae, model.scheduler, class_labels, generators,
                    num_inference_steps=self.protocol.num_inference_steps, guidance_scale=guidance_scale,
                )
            else:
                images = generate_unconditional(
                    model.unet, model.vae, model.scheduler, generators, num_inference_steps=self.protocol.num_inference_steps
                )
        stats = [{} for _ in seeds] if hook is None else _per_image_hook_stats(hook.records, len(seeds))
        return BatchOutput(images=_tensor_to_pil(images), seconds=time.perf_counter() - start, stats=stats)


def _tensor_to_pil(images: torch.Tensor) -> list:
    """Convert (B, 3, H, W) floats in [0, 1] to PIL images."""
    from PIL import Image

    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(item) for item in array]


@contextlib.contextmanager
def _replaced_unet(pipeline, unet):
    """Swap ``pipeline.unet`` for one call; other methods share the same pipeline object."""
    original = pipeline.unet
    pipeline.unet = unet
    try:
        yield
    finally:
        pipeline.unet = original


def _per_image_hook_stats(records: list, batch_size: int) -> list[dict[str, Any]]:
    """Summarise the hook's per-step records into per-image counts of corrected steps."""
    corrected = [0] * batch_size
    for record in records:
        applied = record.applied.tolist()
        for index, flag in enumerate(applied[:batch_size]):
            corrected[index] += int(flag)
    return [{"corrected_steps": count, "steps": len(records)} for count in corrected]
