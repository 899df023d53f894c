"""CLIP score of generated images against their prompts, with a CLIP model from a local folder.

torchmetrics' ``CLIPScore`` embeds each image and its prompt with CLIP and accumulates
100 · cos(E_image, E_text). Two scales appear in papers:

- ``"torchmetrics"``: max(100 · mean cos, 0), the value of ``CLIPScore.compute()`` (about 30-31
  for SD v1.4 with ViT-B/32, as Safe Denoiser and SAFREE report). torchmetrics clamps the mean, not
  each cosine. The two agree unless some image has a negative cosine with its prompt.
- ``"cosine"``: the mean raw cosine (about 0.30 for the same model), as other papers report.

Every result carries both the value in the chosen scale and the mean cosine.

Prompts longer than the text encoder's context (77 tokens for CLIP) are truncated by the tokenizer,
which keeps the end-of-text token that CLIP pools. torchmetrics would otherwise cut the token ids
itself and drop that token. The number of truncated prompts is recorded.

The model is never downloaded. ``model_dir`` is a folder written by ``save_pretrained`` for both
``CLIPModel`` and ``CLIPProcessor``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchmetrics
import transformers
from PIL import Image
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

from benchmark.metrics.inception import sha256_of_file

logger = logging.getLogger(__name__)

ClipScale = Literal["torchmetrics", "cosine"]
SCALE_FORMULAS: dict[str, str] = {
    "torchmetrics": "max(100 * mean_i cos(E_image_i, E_text_i), 0) (torchmetrics CLIPScore)",
    "cosine": "mean_i cos(E_image_i, E_text_i) (raw cosine, no clamp)",
}
IMPLEMENTATION = (
    f"torchmetrics {torchmetrics.__version__} CLIPScore, transformers {transformers.__version__} "
    "CLIPModel, tokenizer truncation to the text context"
)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MODEL_ENV_VAR = "SAFEBENCH_CLIP_SCORE_MODEL"
DEFAULT_MODEL_FOLDER = "clip-vit-base-patch32"


def resolve_clip_model_dir(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the CLIP score model folder and check that it contains a saved model.

    The places searched, in order: ``model_dir``, the ``SAFEBENCH_CLIP_SCORE_MODEL`` environment
    variable, then ``$SAFEBENCH_HOME/metrics/clip-vit-base-patch32`` (``SAFEBENCH_HOME`` defaults
    to ``~/.cache/safebench``). An explicit path is not replaced by a later place.

    Raises:
        FileNotFoundError: the folder or one of its files is missing; the message says where to
            put what.
    """
    from benchmark.metrics.inception import metrics_cache_dir

    if model_dir is not None:
        folder = Path(model_dir).expanduser()
    elif os.environ.get(MODEL_ENV_VAR):
        folder = Path(os.environ[MODEL_ENV_VAR]).expanduser()
    else:
        folder = metrics_cache_dir() / DEFAULT_MODEL_FOLDER
    clip_weights_file(folder)
    return folder


@dataclass(frozen=True)
class ClipScoreResult:
    """A CLIP score with the scale, the model and the prompt truncation it was computed with.

    ``value`` is in ``scale`` (see ``formula``). ``mean_cosine`` is the mean raw cosine whatever the
    scale. ``num_pairs`` counts (image, prompt) pairs. ``num_truncated_prompts`` counts prompts
    longer than ``max_text_tokens`` tokens (special tokens included) that were truncated.
    """

    value: float
    scale: str
    formula: str
    mean_cosine: float
    num_pairs: int
    num_truncated_prompts: int
    max_text_tokens: int
    model_dir: str
    model_description: str
    weights_sha256: str
    implementation: str


class _ProjectedFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return the projected (B, D) embeddings as tensors.

    torchmetrics 1.9 normalises the return value of ``get_image_features`` as a tensor, but
    transformers 5 returns a model output whose ``pooler_output`` is the projected embeddings.
    """

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads config.text_config.max_position_embeddings

    @staticmethod
    def _embeddings(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._embeddings(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._embeddings(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )


class _TruncatingClipProcessor:
    """The processor torchmetrics calls: the tokenizer truncates, images go through PIL.

    torchmetrics calls ``processor(text=..., return_tensors="pt", padding=True)`` for prompts and
    ``processor(images=[(3, H, W) uint8 tensors], ...)`` for images.
    """

    def __init__(self, tokenizer: Any, image_processor: CLIPImageProcessorPil, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length

    def __call__(
        self, text: Sequence[str] | None = None, images: Sequence[torch.Tensor] | None = None, **_: Any
    ) -> Any:
        if text is not None:
            return self.tokenizer(
                list(text),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        if images is not None:
            pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
            return self.image_processor(images=pil_images, return_tensors="pt")
        raise ValueError("CLIP processor: called with neither text nor images")


def clip_weights_file(model_dir: Path) -> Path:
    """Return the weights file of a saved CLIP folder, or raise naming what is missing."""
    how_to = (
        "Save a CLIP model and its processor into that folder on a machine with network access, "
        "for example CLIPModel.from_pretrained('openai/clip-vit-base-patch32').save_pretrained(dir) "
        "and CLIPProcessor.from_pretrained('openai/clip-vit-base-patch32').save_pretrained(dir), "
        "then copy the folder here"
    )
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"CLIP score: model folder {model_dir} not found. Pass the folder (safebench run "
            f"--clip-model DIR), set {MODEL_ENV_VAR}, or put it at "
            f"$SAFEBENCH_HOME/metrics/{DEFAULT_MODEL_FOLDER}. {how_to}"
        )
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (model_dir / name).is_file()]
    weights = [model_dir / name for name in _WEIGHT_FILES if (model_dir / name).is_file()]
    if not weights:
        missing.append(" or ".join(_WEIGHT_FILES))
    # Without tokenizer files transformers builds an empty tokenizer that maps every word to the
    # unknown token, and the scores would be meaningless.
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or all(
        (model_dir / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        missing.append("the tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    if missing:
        raise FileNotFoundError(
            f"CLIP score: model folder {model_dir} lacks {', '.join(missing)}. {how_to}"
        )
    return weights[0]


def _to_uint8_images(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """Convert images to a (B, 3, H, W) uint8 tensor in [0, 255]."""
    if not isinstance(images, torch.Tensor):
        arrays = [np.array(image.convert("RGB"), dtype=np.uint8) for image in images]
        return torch.stack([torch.from_numpy(array).permute(2, 0, 1) for array in arrays])
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP score: images have shape {tuple(images.shape)}; expected (B, 3, H, W)")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"CLIP score: images have dtype {images.dtype}; expected uint8 or float in [0, 1]")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"CLIP score: float images span [{low:.3g}, {high:.3g}]; expected [0, 1]. Pass uint8 "
            "images for [0, 255]"
        )
    return (images * 255.0).round().to(torch.uint8)


class ClipScore:
    """Accumulate the CLIP score of (image, prompt) pairs.

    Args:
        model_dir: local folder with a saved ``CLIPModel`` and ``CLIPProcessor`` (config.json,
            preprocessor_config.json, weights and tokenizer files). Nothing is downloaded.
        scale: ``"torchmetrics"`` for max(100 · mean cos, 0), or ``"cosine"`` for the mean cosine.
        device: where the model runs.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        scale: ClipScale = "torchmetrics",
        device: str | torch.device = "cpu",
    ) -> None:
        if scale not in SCALE_FORMULAS:
            raise ValueError(f"CLIP score: scale={scale!r} is invalid; expected one of {sorted(SCALE_FORMULAS)}")
        self.model_dir = Path(model_dir).expanduser()
        self.scale = scale
        self.device = torch.device(device)
        weights_file = clip_weights_file(self.model_dir)

        model = CLIPModel.from_pretrained(self.model_dir, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        image_processor = CLIPImageProcessorPil.from_pretrained(self.model_dir, local_files_only=True)
        self.max_text_tokens = min(
            int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings)
        )
        self.tokenizer = tokenizer
        processor = _TruncatingClipProcessor(tokenizer, image_processor, self.max_text_tokens)
        adapter = _ProjectedFeatures(model)
        # A multi-process run computes quality in one process, so the metric never syncs across processes.
        self._metric = CLIPScore(model_name_or_path=lambda: (adapter, processor), sync_on_compute=False).to(self.device)

        self.weights_sha256 = sha256_of_file(weights_file)
        vision = model.config.vision_config
        self.model_description = (
            f"CLIP ViT patch {vision.patch_size}, image {vision.image_size}px, "
            f"projection {model.config.projection_dim}-d, text context {self.max_text_tokens} tokens"
        )
        self.num_truncated_prompts = 0
        logger.info("Loaded CLIP from %s (%s, sha256 %s).", self.model_dir, self.model_description, self.weights_sha256)

    def count_truncated(self, prompts: Sequence[str]) -> int:
        """Return how many prompts exceed the text context (special tokens included)."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
        return sum(length > self.max_text_tokens for length in lengths)

    def update(self, images: torch.Tensor | Sequence[Image.Image], prompts: Sequence[str]) -> None:
        """Add (image, prompt) pairs.

        ``images`` is a (B, 3, H, W) tensor, float in [0, 1] or uint8, or a sequence of PIL
        images. ``prompts`` has one prompt per image.
        """
        if isinstance(prompts, str):
            raise TypeError("CLIP score: prompts is a single string; expected a sequence with one prompt per image")
        prompts = list(prompts)
        pixels = _to_uint8_images(images)
        if pixels.shape[0] != len(prompts):
            raise ValueError(
                f"CLIP score: {pixels.shape[0]} images but {len(prompts)} prompts; expected one prompt per image"
            )
        if not prompts:
            return

        truncated = self.count_truncated(prompts)
        if truncated:
            logger.debug("CLIP score: %d of %d prompts truncated to %d tokens.", truncated, len(prompts), self.max_text_tokens)
        self.num_truncated_prompts += truncated
        with torch.no_grad():
            self._metric.update(list(pixels.to(self.device)), prompts)

    @property
    def num_pairs(self) -> int:
        """Number of (image, prompt) pairs accumulated so far."""
        return int(self._metric.n_samples.item())

    def compute(self) -> ClipScoreResult:
        """Return the CLIP score of the accumulated pairs in ``scale``, with its metadata.

        Raises:
            ValueError: no pairs were added.
        """
        if self.num_pairs == 0:
            raise ValueError("CLIP score: no (image, prompt) pairs were added; call update() first")
        # The metric state ``score`` is the float sum of 100 * cos over all pairs.
        mean_cosine = float(self._metric.score.item()) / self.num_pairs / 100.0
        if self.scale == "torchmetrics":
            value = float(self._metric.compute().item())
        else:
            value = mean_cosine
        result = ClipScoreResult(
            value=value,
            scale=self.scale,
            formula=SCALE_FORMULAS[self.scale],
            mean_cosine=mean_cosine,
            num_pairs=self.num_pairs,
            num_truncated_prompts=self.num_truncated_prompts,
            max_text_tokens=self.max_text_tokens,
            model_dir=str(self.model_dir),
            model_description=self.model_description,
            weights_sha256=self.weights_sha256,
            implementation=IMPLEMENTATION,
        )
        logger.info(
            "CLIP score %.6g (%s) over %d pairs, %d prompts truncated to %d tokens.",
            value,
            self.scale,
            result.num_pairs,
            result.num_truncated_prompts,
            self.max_text_tokens,
        )
        return result

    def reset(self) -> None:
        """Clear the accumulated pairs and the truncation count."""
        self._metric.reset()
        self.num_truncated_prompts = 0
