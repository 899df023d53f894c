"""Randomly initialised miniature diffusers pipelines, built from configs alone (no download).

``tiny_sd_pipeline`` is a StableDiffusionPipeline with a 4-channel latent space at 1/2 of the
image resolution, so a 32×32 image has 4×16×16 latents. Its text encoder is a CLIP model with
32-d hidden states. Its tokenizer is a byte-level CLIP tokenizer that pads to SD's 77 tokens; the
vocabulary is the 256 byte symbols, with and without the end-of-word suffix, and the two special
tokens.
``tiny_ddpm_pipeline`` is an unconditional DDPMPipeline on 3×16×16 pixels.
``save_stand_in_inception`` and ``save_tiny_clip`` write stand-in metric weights in the formats the
real files have: a random FID Inception-v3 state dict, and a tiny CLIP ``save_pretrained`` folder.
``save_single_file_checkpoint`` writes a pipeline as one checkpoint in the original SD v1 key layout,
so diffusers' ``from_single_file`` has a file to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "SCHEDULER_NAMES",
    "make_scheduler",
    "save_single_file_checkpoint",
    "save_stand_in_inception",
    "save_tiny_clip",
    "smooth_images",
    "tiny_clip_tokenizer",
    "tiny_ddpm_pipeline",
    "tiny_sd_pipeline",
]

# Stable Diffusion v1's noise schedule.
_SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {"clip_sample": False, "steps_offset": 1}),
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, "steps_offset": 1}),
    "euler": (EulerDiscreteScheduler, {"steps_offset": 1}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {"steps_offset": 1}),
    "lms": (LMSDiscreteScheduler, {"steps_offset": 1}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True, "steps_offset": 1}),
}
SCHEDULER_NAMES = tuple(_SCHEDULERS)


def make_scheduler(name: str = "ddpm", **overrides: Any) -> Any:
    """Build a scheduler with SD v1's noise schedule; ``name`` is one of ``SCHEDULER_NAMES``."""
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULER_NAMES}")
    cls, settings = _SCHEDULERS[name]
    return cls(**{**_SD_SCHEDULE, **settings, **overrides})


def _byte_symbols() -> list[str]:
    """Return the 256 printable symbols that byte-level BPE uses for the bytes 0…255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return [chr(codes[b]) for b in range(256)]


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer with a byte-level vocabulary and no merges (one token per byte)."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_sd_pipeline(scheduler: str = "ddpm", seed: int = 0) -> StableDiffusionPipeline:
    """Build a randomly initialised StableDiffusionPipeline (weights from ``seed``), on the CPU, float32."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ddpm_pipeline(seed: int = 0, scheduler: str = "ddpm") -> DDPMPipeline:
    """Build a randomly initialised unconditional DDPMPipeline on 3×16×16 pixels."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=make_scheduler(scheduler, steps_offset=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def smooth_images(count: int, seed: int, brightness: float = 0.5) -> torch.Tensor:
    """Return (count, 3, 32, 32) images in [0, 1]: upsampled 4x4 noise around ``brightness``."""
    generator = torch.Generator().manual_seed(seed)
    coarse = brightness + 0.25 * torch.randn(count, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0)


def save_stand_in_inception(path: Path) -> Path:
    """Save a random FIDInceptionV3 in pytorch-fid's state-dict layout, with a 1008-way fc as in the real file.

    Its BatchNorm statistics are set from one batch so that its features do not vanish.
    """
    from benchmark.metrics.inception import NUM_FEATURES, FIDInceptionV3

    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics become the statistics of the batch
    model.train()
    with torch.no_grad():
        model(smooth_images(4, seed=100))
    state_dict = {key: value for key, value in model.state_dict().items() if "num_batches_tracked" not in key}
    state_dict["fc.weight"] = torch.zeros(1008, NUM_FEATURES)
    state_dict["fc.bias"] = torch.zeros(1008)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def save_tiny_clip(folder: Path, image_size: int = 32) -> Path:
    """Save a tiny random CLIP model, its byte-level tokenizer and image processor into ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    image_processor.save_pretrained(folder)
    return folder


# Renames of a diffusers ResNet block's layers in the original (LDM) layout.
_LDM_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _ldm_unet_key(key: str, layers: int, attention_up_blocks: set[int]) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_rename_first(rest, _LDM_UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
        position = 1 + block * (layers + 1) + index
        if kind == "resnets":
            return f"input_blocks.{position}.0.{_rename_first(rest, _LDM_UNET_RESNET)}"
        return f"input_blocks.{position}.1.{rest}"
    if kind == "upsamplers":
        slot = 2 if block in attention_up_blocks else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{slot}.{rest}"
    position = block * (layers + 1) + index
    if kind == "resnets":
        return f"output_blocks.{position}.0.{_rename_first(rest, _LDM_UNET_RESNET)}"
    return f"output_blocks.{position}.1.{rest}"


def _ldm_vae_key(key: str, num_up_blocks: int) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key]
    side, kind, *parts = key.split(".")
    if kind == "mid_block":
        group, index, rest = parts[0], int(parts[1]), ".".join(parts[2:])
        if group == "resnets":
            return f"{side}.mid.block_{index + 1}.{_rename_first(rest, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{side}.mid.attn_1.{_rename_first(rest, _LDM_VAE_ATTENTION)}"
    block, group, index, rest = int(parts[0]), parts[1], int(parts[2]), ".".join(parts[3:])
    level, name = (block, "down") if side == "encoder" else (num_up_blocks - 1 - block, "up")
    if group in ("downsamplers", "upsamplers"):
        return f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.{rest}"
    return f"{side}.{name}.{level}.block.{index}.{_rename_first(rest, {'conv_shortcut': 'nin_shortcut'})}"


def save_single_file_checkpoint(pipeline: StableDiffusionPipeline, path: Path) -> Path:
    """Save a Stable Diffusion v1 pipeline as one original-layout (LDM) ``.safetensors`` checkpoint.

    The keys are those of the released SD v1 checkpoints: ``model.diffusion_model.*`` (UNet),
    ``first_stage_model.*`` (VAE, attention projections as 1x1 convolutions) and
    ``cond_stage_model.transformer.*`` (CLIP text encoder).
    """
    from safetensors.torch import save_file

    unet = pipeline.unet
    layers = unet.config.layers_per_block
    attention_up_blocks = {
        index for index, block_type in enumerate(unet.config.up_block_types) if "CrossAttn" in block_type
    }
    state: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        state["model.diffusion_model." + _ldm_unet_key(key, layers, attention_up_blocks)] = value
    num_up_blocks = len(pipeline.vae.config.up_block_types)
    for key, value in pipeline.vae.state_dict().items():
        ldm_key = _ldm_vae_key(key, num_up_blocks)
        if ".attn_1." in ldm_key and value.ndim == 2:
            value = value[:, :, None, None]
        state["first_stage_model." + ldm_key] = value
    for key, value in pipeline.text_encoder.state_dict().items():
        # Released checkpoints nest the encoder under text_model; transformers 5 flattens CLIPTextModel.
        state["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path
