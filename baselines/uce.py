"""UCE: closed-form editing of a UNet's cross-attention projections to erase concepts.

Gandikota, Orgad, Belinkov, Materzyńska and Bau, "Unified Concept Editing in Diffusion Models",
WACV 2024 (arXiv 2308.14761). Every cross-attention key and value projection W (``attn2.to_k``
and ``attn2.to_v``, shape (out, dim)) is replaced by the minimiser of

    Σ_erase s_e ‖W' c_i − W g_i‖² + Σ_preserve s_p ‖W' c_j − W c_j‖² + λ ‖W' − W‖²_F

over token embeddings c (rows of the text encoder's output), which is

    W' = (s_e Σ W g_i c_iᵀ + λ W + s_p Σ W c_j c_jᵀ) · (s_e Σ c_i c_iᵀ + λ I + s_p Σ c_j c_jᵀ)⁻¹.

Token choice, following the authors' ``train-scripts/train_erase.py``
(github.com/rohitgandikota/unified-concept-editing): an erase concept contributes its last content
token, the end token and the padding after them. Its guide contributes the same number of rows,
starting at the guide's own last content token (the start token for an empty guide), so both
sequences are aligned from that token on. A preserve concept contributes every token of its padded
sequence, each mapped to its own current value. The defaults (λ = 0.1, erase scale 1, preserve
scale 0.1) are those of that script. The result is a replacement UNet for an unmodified
``StableDiffusionPipeline``.

Command line (``--model-dir`` is a complete diffusers pipeline folder)::

    python -m baselines.uce --model-dir DIR --erase "nudity" --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from baselines.weights import base_model_record

logger = logging.getLogger(__name__)

SETTINGS_FILE = "uce_settings.json"


@dataclass(frozen=True)
class UCEConfig:
    """Settings of one UCE edit.

    Attributes:
        erase: Concepts to erase.
        guide: One guide concept per erase concept; ``""`` maps a concept to the empty prompt.
        preserve: Concepts whose key and value outputs must stay as they are.
        lamb: λ, the weight of staying close to the original W.
        erase_scale: s_e, the weight of every erase term.
        preserve_scale: s_p, the weight of every preserve term.
        edit_keys: Edit ``to_k`` as well as ``to_v`` (the authors' default).
    """

    erase: tuple[str, ...]
    guide: tuple[str, ...]
    preserve: tuple[str, ...] = ()
    lamb: float = 0.1
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    edit_keys: bool = True

    @classmethod
    def from_concepts(
        cls, erase: Sequence[str], guide: Sequence[str] | str = "", preserve: Sequence[str] = (), **settings: Any
    ) -> UCEConfig:
        """Build a config; a single ``guide`` string applies to every erase concept."""
        erase = _as_tuple(erase, "erase")
        guides = (guide,) * len(erase) if isinstance(guide, str) else _as_tuple(guide, "guide")
        return cls(erase=erase, guide=guides, preserve=_as_tuple(preserve, "preserve"), **settings)

    def __post_init__(self) -> None:
        if len(self.guide) != len(self.erase):
            raise ValueError(
                f"got {len(self.guide)} guide concepts for {len(self.erase)} erase concepts; pass one "
                "guide per erase concept or a single string for all of them"
            )
        if self.lamb <= 0:
            raise ValueError(f"lamb must be > 0 so that the edit is well posed, got {self.lamb}")
        if self.erase_scale < 0 or self.preserve_scale < 0:
            raise ValueError(
                f"erase_scale and preserve_scale must be >= 0, got {self.erase_scale} and {self.preserve_scale}"
            )


def cross_attention_modules(unet: torch.nn.Module) -> dict[str, Attention]:
    """Return the UNet's cross-attention modules (named ``...attn2``), by module name."""
    modules = {
        name: module
        for name, module in unet.named_modules()
        if name.split(".")[-1] == "attn2" and isinstance(module, Attention)
    }
    if not modules:
        raise ValueError(
            f"{type(unet).__name__} has no cross-attention modules named 'attn2'; UCE edits a "
            "text-conditioned diffusers UNet2DConditionModel"
        )
    return modules


@torch.no_grad()
def encode_tokens(text_encoder: Any, tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode texts the way ``StableDiffusionPipeline.encode_prompt`` does, without the CLIP skip.

    The attention mask reaches the encoder only when ``text_encoder.config.use_attention_mask`` is
    true, as in the pipeline.

    Returns:
        Hidden states (len(texts), max_length, dim) in float64, and the attention mask
        (len(texts), max_length).
    """
    tokens = tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    attention_mask = tokens.attention_mask.to(device)
    if getattr(text_encoder.config, "use_attention_mask", False):
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]
    else:
        hidden = text_encoder(tokens.input_ids.to(device))[0]
    return hidden.double(), tokens.attention_mask


def aligned_erase_rows(
    text_encoder: Any, tokenizer: Any, erase: str, guide: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings of an erase concept and its guide, aligned row by row, shape (rows, dim) each.

    Each sequence starts at its last content token (the token before the end token), so the last
    word, the end token and the padding of both texts line up. Both are cut to the shorter length.
    """
    hidden, mask = encode_tokens(text_encoder, tokenizer, [erase, guide])
    length = hidden.shape[1]
    erase_start = max(int(mask[0].sum()) - 2, 0)
    guide_start = max(int(mask[1].sum()) - 2, 0)
    rows = length - max(erase_start, guide_start)
    return hidden[0, erase_start : erase_start + rows], hidden[1, guide_start : guide_start + rows]


def solve_uce_weight(
    weight: torch.Tensor,
    erase_inputs: torch.Tensor,
    guide_inputs: torch.Tensor,
    preserve_inputs: torch.Tensor,
    *,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """Return the closed-form UCE edit of one projection weight.

    Args:
        weight: W, shape (out, dim).
        erase_inputs: c_i, shape (n_erase, dim).
        guide_inputs: g_i, shape (n_erase, dim); the targets are W g_i.
        preserve_inputs: c_j, shape (n_preserve, dim); the targets are W c_j.
        lamb, erase_scale, preserve_scale: λ, s_e, s_p as in ``UCEConfig``.

    Returns:
        W' with the shape and dtype of ``weight``. The solve runs in float64.
    """
    original = weight.double()
    dim = original.shape[1]
    erase_inputs = erase_inputs.double().to(original.device)
    guide_inputs = guide_inputs.double().to(original.device)
    preserve_inputs = preserve_inputs.double().to(original.device)

    targets = guide_inputs @ original.T  # (n_erase, out): W g_i as rows
    numerator = lamb * original + erase_scale * targets.T @ erase_inputs
    numerator = numerator + preserve_scale * (original @ preserve_inputs.T) @ preserve_inputs
    gram = lamb * torch.eye(dim, dtype=torch.float64, device=original.device)
    gram = gram + erase_scale * erase_inputs.T @ erase_inputs + preserve_scale * preserve_inputs.T @ preserve_inputs
    # W' · gram = numerator, and gram is symmetric, so W'ᵀ = gram⁻¹ · numeratorᵀ.
    edited = torch.linalg.solve(gram, numerator.T).T
    return edited.to(weight.dtype)


def uce_edit(
    model: Any,
    erase: Sequence[str],
    guide: Sequence[str] | str = "",
    preserve: Sequence[str] = (),
    *,
    text_encoder: Any = None,
    tokenizer: Any = None,
    lamb: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    edit_keys: bool = True,
) -> UNet2DConditionModel:
    """Erase concepts by editing every cross-attention ``to_k`` and ``to_v`` weight in closed form.

    Args:
        model: A ``StableDiffusionPipeline`` (its ``unet``, ``text_encoder`` and ``tokenizer`` are
            used), or a ``UNet2DConditionModel`` together with ``text_encoder`` and ``tokenizer``.
        erase: Concepts to erase, e.g. ``["nudity"]``. With none, the result equals the input UNet.
        guide: The concept each erased one maps to: one string for all, or one per erase concept.
        preserve: Concepts whose projections must not change.
        text_encoder, tokenizer: Required when ``model`` is a UNet; override the pipeline's otherwise.
        lamb, erase_scale, preserve_scale, edit_keys: See ``UCEConfig``.

    Returns:
        An edited deep copy of the UNet; the input is not modified. Only ``attn2.to_k.weight`` and
        ``attn2.to_v.weight`` differ from it.
    """
    unet = getattr(model, "unet", model)
    text_encoder = text_encoder if text_encoder is not None else getattr(model, "text_encoder", None)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if text_encoder is None or tokenizer is None:
        raise ValueError(
            f"UCE needs a text encoder and a tokenizer: pass a pipeline, or pass text_encoder= and "
            f"tokenizer= with the {type(unet).__name__}"
        )
    config = UCEConfig.from_concepts(
        erase,
        guide,
        preserve,
        lamb=lamb,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        edit_keys=edit_keys,
    )
    return apply_uce(unet, text_encoder, tokenizer, config)


def apply_uce(unet: UNet2DConditionModel, text_encoder: Any, tokenizer: Any, config: UCEConfig) -> UNet2DConditionModel:
    """Apply the edit described by ``config`` to a deep copy of ``unet``; see ``uce_edit``."""
    erase_rows: list[torch.Tensor] = []
    guide_rows: list[torch.Tensor] = []
    for erase_text, guide_text in zip(config.erase, config.guide):
        erase_part, guide_part = aligned_erase_rows(text_encoder, tokenizer, erase_text, guide_text)
        erase_rows.append(erase_part)
        guide_rows.append(guide_part)
    dim = _hidden_size(text_encoder, tokenizer)
    empty = torch.zeros(0, dim, dtype=torch.float64)
    erase_inputs = torch.cat(erase_rows) if erase_rows else empty
    guide_inputs = torch.cat(guide_rows) if guide_rows else empty
    if config.preserve:
        hidden, _ = encode_tokens(text_encoder, tokenizer, config.preserve)
        preserve_inputs = hidden.reshape(-1, hidden.shape[-1])
    else:
        preserve_inputs = empty

    edited = copy.deepcopy(unet)
    projections = ("to_k", "to_v") if config.edit_keys else ("to_v",)
    attention_modules = cross_attention_modules(edited)
    with torch.no_grad():
        for name, attention in attention_modules.items():
            for projection_name in projections:
                layer = getattr(attention, projection_name)
                if layer.weight.shape[1] != dim:
                    raise ValueError(
                        f"{name}.{projection_name} takes {layer.weight.shape[1]}-d inputs but the text "
                        f"encoder returns {dim}-d hidden states: the UNet and text encoder are from "
                        "different models"
                    )
                layer.weight.copy_(
                    solve_uce_weight(
                        layer.weight,
                        erase_inputs,
                        guide_inputs,
                        preserve_inputs,
                        lamb=config.lamb,
                        erase_scale=config.erase_scale,
                        preserve_scale=config.preserve_scale,
                    )
                )
    logger.info(
        "UCE edited %d cross-attention modules: erase %s toward %s, preserve %d concepts",
        len(attention_modules), list(config.erase), list(config.guide), len(config.preserve),
    )
    return edited


def _hidden_size(text_encoder: Any, tokenizer: Any) -> int:
    hidden, _ = encode_tokens(text_encoder, tokenizer, [""])
    return hidden.shape[-1]


def _as_tuple(values: Sequence[str] | str, name: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, got the string {values!r}; wrap it in a list")
    return tuple(values)


def save_uce_unet(unet: UNet2DConditionModel, config: UCEConfig, out_dir: Path | str, extra: dict[str, Any] | None = None) -> Path:
    """Write the edited UNet in diffusers format (safetensors) and ``uce_settings.json``."""
    out_dir = Path(out_dir)
    unet.save_pretrained(out_dir, safe_serialization=True)
    record = {
        "method": "uce",
        "erase": list(config.erase),
        "guide": list(config.guide),
        "preserve": list(config.preserve),
        "lamb": config.lamb,
        "erase_scale": config.erase_scale,
        "preserve_scale": config.preserve_scale,
        "edit_keys": config.edit_keys,
        "torch_version": torch.__version__,
        **(extra or {}),
    }
    (out_dir / SETTINGS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    logger.info("saved the UCE UNet to %s", out_dir)
    return out_dir


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m baselines.uce",
        description="Erase concepts from a StableDiffusionPipeline's UNet with UCE and save the UNet.",
    )
    parser.add_argument("--model-dir", required=True, help="diffusers pipeline folder (text encoder included)")
    parser.add_argument("--erase", required=True, action="append", help="concept to erase (repeatable)")
    parser.add_argument(
        "--guide", action="append", default=None,
        help="concept to map an erased one to (repeat once per --erase, or give once for all); default ''",
    )
    parser.add_argument("--preserve", action="append", default=[], help="concept to keep unchanged (repeatable)")
    parser.add_argument("--out", required=True, help="output folder for the UNet (config.json + safetensors)")
    parser.add_argument("--lamb", type=float, default=0.1, help="λ, weight of staying close to the original W")
    parser.add_argument("--erase-scale", type=float, default=1.0, help="weight of each erase term")
    parser.add_argument("--preserve-scale", type=float, default=0.1, help="weight of each preserve term")
    parser.add_argument("--values-only", action="store_true", help="edit to_v only, not to_k")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run UCE from the command line; see ``--help``."""
    from diffusers import StableDiffusionPipeline

    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = Path(args.model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise SystemExit(
            f"--model-dir {model_dir} is not a diffusers pipeline folder (no model_index.json); "
            "pass the output of StableDiffusionPipeline.save_pretrained"
        )
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None)
    guide: Sequence[str] | str = ""
    if args.guide and len(args.guide) == 1:
        guide = args.guide[0]
    elif args.guide:
        guide = args.guide
    config = UCEConfig.from_concepts(
        args.erase,
        guide,
        args.preserve,
        lamb=args.lamb,
        erase_scale=args.erase_scale,
        preserve_scale=args.preserve_scale,
        edit_keys=not args.values_only,
    )
    start = time.perf_counter()
    unet = apply_uce(pipeline.unet, pipeline.text_encoder, pipeline.tokenizer, config)
    seconds = time.perf_counter() - start
    save_uce_unet(unet, config, args.out, extra={**base_model_record(model_dir), "edit_seconds": round(seconds, 3)})


if __name__ == "__main__":
    main()
