"""SAFREE (Yoon et al., ICLR 2025, arXiv 2410.12761) as a prompt-embedding edit plus a UNet hook.

Per prompt, before sampling:

1. Toxic subspace. The concept phrases' pooled text embeddings c_k (K × D) span the toxic subspace;
   P_C is the projection onto it.
2. Trigger tokens. For each real token i, encode the prompt with token i replaced by a mask token
   and pool it: p_\\i. Its residual distance to the toxic subspace is d_i = ‖(I − P_C) p_\\i‖. Masking
   a trigger token moves the prompt away from the subspace, so token i is a trigger when
   d_i ≥ (1 + α) · mean_{j≠i} d_j.
3. Projection. The input space is the span of the masked prompt embeddings {p_\\i}, with projection
   P_I. A trigger token's embedding e becomes (I − P_C) P_I e: inside the input space and orthogonal
   to the toxic subspace. Other tokens keep their embeddings.
4. Self-validating filter. From the mean cosine similarity s between the original token embeddings
   and their projections, the projected embedding is used for the denoising steps 0 … t'(s), and
   the original embedding after them.
5. Latent re-attention. FreeU's Fourier filter on the UNet decoder's skip features
   (b1 = b2 = 1.0, s1 = 0.9, s2 = 0.2) during the defended call.

Steps 1–4 act on the conditional text embedding only; the unconditional (negative prompt) half is
unchanged. The settings' defaults are the ones SAFREE's authors released for nudity and that the
safe denoiser paper ran SAFREE with: α = 0.01, γ = 10, FreeU 1.0-1.0-0.9-0.2, and the concept phrases
comma-joined as the negative prompt.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPTextModel

from baselines.guidance import (
    GuidanceDefense,
    UNetCall,
    classifier_free_guidance_enabled,
    wrapped_unet_forward,
)

__all__ = [
    "FILTER_FORMS",
    "SAFREE",
    "SAFREEConfig",
    "SafreePromptAnalysis",
    "SafreeStepRecord",
    "pooled_text_embeddings",
    "project_token_embeddings",
    "projection_matrix",
    "self_validating_last_step",
    "trigger_token_mask",
]

logger = logging.getLogger(__name__)

FILTER_FORMS = ("released-code", "paper")
_FREEU_ATTRIBUTES = ("s1", "s2", "b1", "b2")


@dataclass(frozen=True)
class SAFREEConfig:
    """SAFREE settings.

    Attributes:
        alpha: α of the trigger rule d_i ≥ (1 + α) · mean_{j≠i} d_j.
        self_validating_filter: limit the projected embedding to steps 0 … t'; when False it is used
            at every step.
        gamma: γ, the maximum t' of the filter, in denoising steps.
        filter_form: ``"released-code"`` or ``"paper"``, the curve from similarity to t' (see
            :func:`self_validating_last_step`).
        re_attention: apply FreeU's Fourier filter during the call.
        freeu_b1, freeu_b2, freeu_s1, freeu_s2: FreeU's backbone (b) and skip (s) scales for the
            two lowest-resolution decoder stages.
        mask_token_id: token id that replaces a token when measuring its influence.
        concept_negative_prompt: when the caller passes no negative prompt, use the concept phrases
            comma-joined, as SAFREE's released generation script does.
    """

    alpha: float = 0.01
    self_validating_filter: bool = True
    gamma: float = 10.0
    filter_form: str = "released-code"
    re_attention: bool = True
    freeu_b1: float = 1.0
    freeu_b2: float = 1.0
    freeu_s1: float = 0.9
    freeu_s2: float = 0.2
    # NOTE: 0 is the id SAFREE's released code writes over the token, which is "!" in CLIP's
    # vocabulary and [PAD] in BERT's. The paper does not name the mask token.
    mask_token_id: int = 0
    concept_negative_prompt: bool = True

    def __post_init__(self) -> None:
        if self.filter_form not in FILTER_FORMS:
            raise ValueError(f"filter_form must be one of {FILTER_FORMS}, got {self.filter_form!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 denoising steps, got {self.gamma}")
        if self.alpha <= -1.0:
            raise ValueError(f"alpha must be > -1 so that (1 + alpha) stays positive, got {self.alpha}")


# -- the algebra, on plain tensors ----------------------------------------------------------------


def projection_matrix(vectors: Tensor) -> Tensor:
    """Return the (D, D) orthogonal projection onto the span of the rows of ``vectors`` (N, D).

    Computed in float64 with a pseudo-inverse, so linearly dependent rows are allowed.
    """
    basis = vectors.to(torch.float64).T  # (D, N)
    return basis @ torch.linalg.pinv(basis.T @ basis) @ basis.T


def trigger_token_mask(distances: Tensor, alpha: float) -> Tensor:
    """Flag trigger tokens from the residual distances d_i (n,) of the masked prompts.

    Token i is a trigger when d_i ≥ (1 + α) · mean_{j≠i} d_j. A prompt with fewer than two tokens
    has no leave-one-out mean, and none of its tokens is flagged.
    """
    count = distances.numel()
    if count < 2:
        return torch.zeros(count, dtype=torch.bool)
    others_mean = (distances.sum() - distances) / (count - 1)
    return distances >= (1.0 + alpha) * others_mean


def project_token_embeddings(token_embeddings: Tensor, input_projection: Tensor, concept_projection: Tensor) -> Tensor:
    """Map every token embedding e (rows of an (L, D) tensor) to (I − P_C) P_I e.

    Returns a float64 (L, D) tensor. Both projections are symmetric, so in row form this is
    E · P_I · (I − P_C).
    """
    embeddings = token_embeddings.to(torch.float64)
    identity = torch.eye(concept_projection.shape[0], dtype=torch.float64, device=embeddings.device)
    return embeddings @ input_projection.to(torch.float64) @ (identity - concept_projection.to(torch.float64))


def self_validating_last_step(similarity: float, gamma: float, form: str = "released-code") -> int:
    """Return t', the last 0-based denoising step that uses the projected embedding (-1: none).

    ``similarity`` is the mean cosine similarity s of original and projected token embeddings.
    t' never increases with s, so a prompt that the projection barely changes keeps its own embedding.

    - ``"paper"``: t' = round(γ · sigmoid(1 − s)), the formula printed in the SAFREE paper.
    - ``"released-code"``: t' = round(γ · sigmoid(5 · (10 · (1 − s) − 5.333))), the curve of
      SAFREE's released code for non-artist concepts (its ``f_beta``), which switches from 0 to γ
      around s ≈ 0.47.

    NOTE: the paper and the released code disagree on this curve; ``SAFREEConfig.filter_form``
    picks one, and the released code's is the default because it produced the published numbers.
    """
    if math.isnan(similarity):
        return -1
    distance = 1.0 - similarity
    if form == "paper":
        value = _sigmoid(distance)
    elif form == "released-code":
        value = _sigmoid(2.0 * 2.5 * (10.0 * distance - 5.333))
    else:
        raise ValueError(f"form must be one of {FILTER_FORMS}, got {form!r}")
    return int(round(gamma * value))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


# -- text encoder access -------------------------------------------------------------------------------


@torch.no_grad()
def pooled_text_embeddings(text_encoder: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Return one embedding per sequence, (N, D), in the space of the token embeddings.

    CLIP's text model pools at the end-of-text token (``pooler_output``, the token state SD's
    prompts end in), as SAFREE does. Other encoders (e.g. BERT-style sentence encoders) are pooled
    by the mean of their attended token states.

    NOTE: SAFREE defines the pooled embedding for CLIP only; the mean pooling for other encoders
    is this suite's choice (it is all-MiniLM-L6-v2's own sentence embedding).
    """
    device = next(text_encoder.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    output = text_encoder(input_ids, attention_mask=attention_mask)
    if isinstance(text_encoder, CLIPTextModel):
        return output.pooler_output
    hidden = output[0]
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@dataclass(frozen=True)
class SafreePromptAnalysis:
    """SAFREE's analysis of one prompt.

    Attributes:
        prompt: the prompt text.
        token_positions: positions of the real (non-special) tokens in the padded sequence.
        tokens: those tokens as strings.
        distances: d_i, (n,), residual distance of each masked prompt to the toxic subspace.
        trigger_mask: (L,) bool over the padded sequence, True at trigger tokens.
        original_embeds: (L, D) token embeddings of the prompt, as the pipeline encodes it.
        safree_embeds: (L, D) the same with trigger tokens projected.
        similarity: mean cosine similarity of the original and projected embeddings over the
            attended positions (every token projected, as the filter prescribes).
        last_projected_step: t', the last 0-based step that uses ``safree_embeds``; -1 for none.
    """

    prompt: str
    token_positions: tuple[int, ...]
    tokens: tuple[str, ...]
    distances: Tensor
    trigger_mask: Tensor
    original_embeds: Tensor
    safree_embeds: Tensor
    similarity: float
    last_projected_step: int

    @property
    def trigger_tokens(self) -> tuple[str, ...]:
        """The tokens flagged as triggers, in prompt order."""
        flagged = set(torch.nonzero(self.trigger_mask).flatten().tolist())
        return tuple(token for position, token in zip(self.token_positions, self.tokens) if position in flagged)


@dataclass(frozen=True)
class SafreeStepRecord:
    """Record of one UNet call under SAFREE.

    Attributes:
        step: 0-based denoising step index.
        projected: per conditional sample, whether the projected embedding was used.
        re_attention: whether FreeU's filter was on for this call.
    """

    step: int
    projected: tuple[bool, ...]
    re_attention: bool


class SAFREE(GuidanceDefense):
    """SAFREE through prompt embeddings and a wrapper of ``pipeline.unet.forward``.

    Args:
        concept_prompts: phrases that span the toxic subspace (e.g. ``NUDITY_CONCEPTS``).
        overrides: any ``SAFREEConfig`` field.

    After a call, ``analyses`` has one :class:`SafreePromptAnalysis` per prompt and ``records``
    one :class:`SafreeStepRecord` per UNet call.
    """

    name = "safree"

    def __init__(self, concept_prompts: Sequence[str], **overrides: Any) -> None:
        concept_prompts = [str(phrase) for phrase in concept_prompts]
        if not concept_prompts or not all(phrase.strip() for phrase in concept_prompts):
            raise ValueError(f"SAFREE needs at least one non-empty concept phrase, got {concept_prompts!r}")
        known = {field.name for field in fields(SAFREEConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown SAFREE settings {unknown}; expected any of {sorted(known)}")
        self.concept_prompts = tuple(concept_prompts)
        self.config = SAFREEConfig(**overrides)
        self.analyses: list[SafreePromptAnalysis] = []
        self.records: list[SafreeStepRecord] = []

    def settings(self) -> dict[str, Any]:
        return {"defense": "safree", "concept_prompts": list(self.concept_prompts), **asdict(self.config)}

    @property
    def concept_negative_prompt(self) -> str:
        """The concept phrases comma-joined, SAFREE's negative prompt."""
        return ", ".join(self.concept_prompts)

    # -- analysis -------------------------------------------------------------------------------

    def concept_projection(self, pipeline: Any) -> Tensor:
        """Return P_C, the (D, D) float64 projection onto the toxic subspace of this pipeline's encoder."""
        tokens = pipeline.tokenizer(
            list(self.concept_prompts),
            padding="max_length",
            max_length=pipeline.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        concept_embeds = pooled_text_embeddings(pipeline.text_encoder, tokens.input_ids, tokens.attention_mask)
        return projection_matrix(concept_embeds.cpu())

    @torch.no_grad()
    def analyse(
        self, pipeline: Any, prompts: Sequence[str], prompt_embeds: Tensor | None = None
    ) -> list[SafreePromptAnalysis]:
        """Detect trigger tokens, project them and run the self-validating filter for each prompt.

        Args:
            pipeline: a ``StableDiffusionPipeline`` (its tokenizer and text encoder are used).
            prompts: B prompts.
            prompt_embeds: (B, L, D) token embeddings as ``pipeline.encode_prompt`` returns them;
                encoded here when None.
        """
        if prompt_embeds is None:
            prompt_embeds, _ = pipeline.encode_prompt(list(prompts), pipeline.unet.device, 1, False)
        concept_projection = self.concept_projection(pipeline)
        return [
            self._analyse_prompt(pipeline, prompt, prompt_embeds[index], concept_projection)
            for index, prompt in enumerate(prompts)
        ]

    def _analyse_prompt(
        self, pipeline: Any, prompt: str, original_embeds: Tensor, concept_projection: Tensor
    ) -> SafreePromptAnalysis:
        tokenizer = pipeline.tokenizer
        encoded = tokenizer(
            prompt,
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_special_tokens_mask=True,
            return_attention_mask=True,
        )
        input_ids = torch.tensor(encoded["input_ids"])
        positions = [index for index, special in enumerate(encoded["special_tokens_mask"]) if not special]
        tokens = tuple(tokenizer.convert_ids_to_tokens([int(input_ids[p]) for p in positions]))
        length, dim = original_embeds.shape
        attended = torch.zeros(length, dtype=torch.bool)
        attended[: input_ids.numel()] = torch.tensor(encoded["attention_mask"], dtype=torch.bool)

        if not positions:
            # An empty prompt has no token to mask, so nothing is flagged or projected.
            return SafreePromptAnalysis(
                prompt=prompt,
                token_positions=(),
                tokens=(),
                distances=torch.zeros(0, dtype=torch.float64),
                trigger_mask=torch.zeros(length, dtype=torch.bool),
                original_embeds=original_embeds,
                safree_embeds=original_embeds,
                similarity=1.0,
                last_projected_step=-1,
            )

        masked_ids = input_ids.repeat(len(positions), 1)
        for row, position in enumerate(positions):
            masked_ids[row, position] = self.config.mask_token_id
        masked_embeds = pooled_text_embeddings(
            pipeline.text_encoder, masked_ids, torch.ones_like(masked_ids)
        ).cpu().to(torch.float64)

        identity = torch.eye(dim, dtype=torch.float64)
        distances = (masked_embeds @ (identity - concept_projection)).norm(dim=1)
        triggers = trigger_token_mask(distances, self.config.alpha)
        trigger_mask = torch.zeros(length, dtype=torch.bool)
        trigger_mask[torch.tensor(positions)[triggers]] = True

        input_projection = projection_matrix(masked_embeds)
        original = original_embeds.detach().cpu().to(torch.float64)
        projected = project_token_embeddings(original, input_projection, concept_projection)
        safree_embeds = torch.where(trigger_mask.unsqueeze(1), projected, original)

        # NOTE: the filter compares every attended token with its projection, not only the trigger
        # tokens, as SAFREE's released code does. The paper's cos(p, p_proj) leaves this open.
        similarity = float(torch.nn.functional.cosine_similarity(projected[attended], original[attended], dim=-1).mean())
        last_step = self_validating_last_step(similarity, self.config.gamma, self.config.filter_form)
        analysis = SafreePromptAnalysis(
            prompt=prompt,
            token_positions=tuple(positions),
            tokens=tokens,
            distances=distances,
            trigger_mask=trigger_mask,
            original_embeds=original_embeds,
            safree_embeds=safree_embeds.to(device=original_embeds.device, dtype=original_embeds.dtype),
            similarity=similarity,
            last_projected_step=last_step,
        )
        logger.debug(
            "SAFREE prompt %r: triggers %s, similarity %.4f, projected steps 0..%d",
            prompt,
            analysis.trigger_tokens,
            similarity,
            last_step,
        )
        return analysis

    # -- the defended call --------------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(
        self,
        pipeline: Any,
        *,
        prompts: list[str],
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_inference_steps: int,
    ) -> Iterator[dict[str, Any]]:
        if self.config.re_attention and not hasattr(pipeline.unet, "enable_freeu"):
            raise TypeError(
                f"SAFREE's latent re-attention needs a UNet with enable_freeu, got {type(pipeline.unet).__name__}; "
                "pass re_attention=False"
            )
        do_cfg = classifier_free_guidance_enabled(pipeline, guidance_scale)
        if negative_prompts is None and self.config.concept_negative_prompt and do_cfg:
            negative_prompts = [self.concept_negative_prompt] * len(prompts)
        with torch.no_grad():
            prompt_embeds, negative_prompt_embeds = pipeline.encode_prompt(
                list(prompts), pipeline.unet.device, 1, do_cfg, negative_prompt=negative_prompts
            )
        self.analyses = self.analyse(pipeline, prompts, prompt_embeds)
        self.records = []
        safree_embeds = torch.stack([analysis.safree_embeds for analysis in self.analyses])
        last_steps = torch.tensor([analysis.last_projected_step for analysis in self.analyses])
        if not self.config.self_validating_filter:
            last_steps = torch.full_like(last_steps, num_inference_steps)

        def handler(forward: Any, call: UNetCall) -> Any:
            hidden = call.arguments["encoder_hidden_states"]
            cond = hidden[hidden.shape[0] // 2 :] if do_cfg else hidden
            if cond.shape[0] % len(prompts):
                raise RuntimeError(
                    f"SAFREE was applied for {len(prompts)} prompts, but the UNet's conditional batch has "
                    f"{cond.shape[0]} samples; pass the same prompts to applied() and to the pipeline"
                )
            repeats = cond.shape[0] // len(prompts)
            projected = (call.step <= last_steps).repeat_interleave(repeats)
            replacement = safree_embeds.repeat_interleave(repeats, dim=0).to(device=cond.device, dtype=cond.dtype)
            new_cond = torch.where(projected.to(cond.device)[:, None, None], replacement, cond)
            new_hidden = torch.cat([hidden[: hidden.shape[0] // 2], new_cond]) if do_cfg else new_cond
            self.records.append(
                SafreeStepRecord(step=call.step, projected=tuple(projected.tolist()), re_attention=self.config.re_attention)
            )
            with self._re_attention(pipeline.unet):
                return call.call(forward, encoder_hidden_states=new_hidden)

        extra: dict[str, Any] = {"prompt": None, "prompt_embeds": prompt_embeds}
        if do_cfg:
            extra.update(negative_prompt=None, negative_prompt_embeds=negative_prompt_embeds)
        with wrapped_unet_forward(pipeline.unet, handler):
            yield extra

    @contextlib.contextmanager
    def _re_attention(self, unet: Any) -> Iterator[None]:
        """Turn FreeU's filter on for one UNet call, then restore the decoder blocks' previous FreeU state.

        NOTE: SAFREE's released code registers FreeU for the whole generation and batches a third
        chunk (the UNet on the original prompt embedding) whose output it discards. FreeU's filter
        acts on each sample alone, so that chunk cannot change the result and is not evaluated here.
        """
        if not self.config.re_attention:
            yield
            return
        previous = [{key: getattr(block, key, None) for key in _FREEU_ATTRIBUTES} for block in unet.up_blocks]
        unet.enable_freeu(
            s1=self.config.freeu_s1, s2=self.config.freeu_s2, b1=self.config.freeu_b1, b2=self.config.freeu_b2
        )
        try:
            yield
        finally:
            for block, attributes in zip(unet.up_blocks, previous):
                for key, value in attributes.items():
                    setattr(block, key, value)
