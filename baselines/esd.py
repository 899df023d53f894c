"""ESD: erasing a concept from a text-to-image UNet by fine-tuning against negative guidance.

Gandikota, Materzyńska, Fiotto-Kaufman and Bau, "Erasing Concepts from Diffusion Models",
ICCV 2023 (arXiv 2303.07345). The fine-tuned UNet θ learns to predict, for the concept prompt c,
the noise that the frozen original θ* predicts under *negative* classifier-free guidance:

    ε_θ(x_t, c, t)  ←  ε_θ*(x_t, ∅, t) − η · [ε_θ*(x_t, c, t) − ε_θ*(x_t, ∅, t)]

Each step draws a DDIM step index k and samples x_t by running k DDIM steps from Gaussian noise
with the model being fine-tuned, under classifier-free guidance ``start_guidance`` on c. It then
takes one Adam step on the MSE between both sides at that timestep. x_t is evaluated at the
timestep it was sampled to, as in the authors' diffusers script (``esd_sd.py`` in
github.com/rohitgandikota/erasing). That script samples x_t with the frozen model instead of the
fine-tuned one; this module follows the paper's description and samples with θ. The result is a replacement UNet for an unmodified
``StableDiffusionPipeline``.

Command line (``--model-dir`` is a complete diffusers pipeline folder, text encoder included; for
the embedded miniature model write one with ``benchmark.mini.export_text2img_pipeline``)::

    python -m baselines.esd --model-dir DIR --concept "nudity" --method esd-u --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel

from baselines.weights import base_model_record

logger = logging.getLogger(__name__)

ESD_METHODS: tuple[str, ...] = ("esd-u", "esd-x")
SETTINGS_FILE = "esd_settings.json"


@dataclass(frozen=True)
class ESDConfig:
    """Settings of one ESD run.

    The paper's settings for Stable Diffusion v1.4 are ``lr=1e-5``, 1000 iterations (batch size
    1, Adam), ``negative_guidance`` η = 1, ``start_guidance`` 3 and 50 DDIM steps for sampling x_t,
    with ESD-u for nudity and ESD-x for artistic styles. The defaults here (``steps=300``,
    ``lr=1e-4``) are sized for the embedded miniature model, whose UNet has 3.4 M parameters
    (about 1/250 of SD v1's) on 8×8×4 latents. They are 10× the paper's learning rate for a
    third of its steps, so that erasing the digit 7 takes about 1.5 to 2.5 minutes on one shared
    CPU core. With them ESD-u removed every 7 from the miniature model's 120 unsafe test prompts
    and left its benign accuracy unchanged (``baselines/weights/mini-esd-u/README.md``). No other
    settings were compared.

    Attributes:
        concept: Prompt naming the concept to erase, e.g. ``"nudity"``.
        method: ``"esd-u"`` trains every Linear and Conv2d layer outside cross-attention (the
            unconditional layers), ``"esd-x"`` only the cross-attention (``attn2``) Linear layers.
        negative_guidance: η, the strength of the negative guidance target.
        start_guidance: Classifier-free guidance scale used when sampling x_t.
        steps: Number of optimiser steps (one x_t each).
        lr: Adam learning rate.
        ddim_steps: Number of DDIM steps of the sampling schedule from which k is drawn.
        seed: Seed of the step-index and noise streams.
    """

    concept: str
    method: str = "esd-u"
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    steps: int = 300
    lr: float = 1e-4
    ddim_steps: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ESD_METHODS:
            raise ValueError(f"invalid ESD method {self.method!r}; expected one of {ESD_METHODS}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {self.ddim_steps}")
        if not self.concept.strip():
            raise ValueError("concept is empty; pass the prompt that names the concept to erase")


@dataclass(frozen=True)
class ESDOutput:
    """Result of ``run_esd``.

    Attributes:
        unet: The fine-tuned UNet (a new module; the pipeline's UNet is not modified), eval mode.
        config: The settings of the run.
        losses: The MSE loss of every step, in order (length ``config.steps``).
        timesteps: The scheduler timestep of every step's x_t.
        seconds: Wall-clock training time in seconds.
        trained_parameters: Names of the parameters that were optimised.
    """

    unet: UNet2DConditionModel
    config: ESDConfig
    losses: tuple[float, ...]
    timesteps: tuple[int, ...]
    seconds: float
    trained_parameters: tuple[str, ...] = field(repr=False)


def esd_trainable_parameters(unet: torch.nn.Module, method: str) -> dict[str, torch.nn.Parameter]:
    """Select the parameters that ESD-u or ESD-x fine-tunes, by name.

    The selection follows the authors' diffusers script (``esd_sd.py`` in
    github.com/rohitgandikota/erasing): the weights and biases of ``nn.Linear`` and ``nn.Conv2d``
    modules whose name contains ``attn2`` (ESD-x) or does not (ESD-u). Normalisation layers are
    never trained.
    """
    if method not in ESD_METHODS:
        raise ValueError(f"invalid ESD method {method!r}; expected one of {ESD_METHODS}")
    selected: dict[str, torch.nn.Parameter] = {}
    for module_name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        in_cross_attention = "attn2" in module_name.split(".")
        if in_cross_attention != (method == "esd-x"):
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            selected[f"{module_name}.{parameter_name}"] = parameter
    if not selected:
        raise ValueError(
            f"no parameters selected for {method!r} in {type(unet).__name__}; ESD expects a UNet with "
            "cross-attention modules named 'attn2' (diffusers UNet2DConditionModel)"
        )
    return selected


def run_esd(
    pipeline: Any,
    config: ESDConfig,
    *,
    num_threads: int | None = None,
    callback: Callable[[int, float], None] | None = None,
    log_every: int = 50,
) -> ESDOutput:
    """Fine-tune a copy of ``pipeline.unet`` with ESD.

    The pipeline itself is not modified: its UNet serves as the frozen original θ*, and a deep copy
    is trained. x_t has the UNet's native latent shape (1, in_channels, sample_size, sample_size).

    Args:
        pipeline: A ``StableDiffusionPipeline`` (or any pipeline with ``unet``, ``scheduler`` and
            ``encode_prompt``) in float32.
        config: The ESD settings.
        num_threads: If given, ``torch.set_num_threads`` for the run (restored afterwards).
        callback: Called as ``callback(step, loss)`` after every step.
        log_every: Log the running loss every this many steps.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(pipeline, config, callback, log_every)
    finally:
        torch.set_num_threads(previous_threads)


def train_esd(
    pipeline: Any,
    concept: str,
    *,
    method: str = "esd-u",
    negative_guidance: float = 1.0,
    start_guidance: float = 3.0,
    steps: int = ESDConfig.steps,
    lr: float = ESDConfig.lr,
    ddim_steps: int = 50,
    seed: int = 0,
    num_threads: int | None = None,
) -> UNet2DConditionModel:
    """Erase ``concept`` with ESD and return the fine-tuned UNet; see ``ESDConfig`` for the settings.

    The paper's settings for Stable Diffusion are ``lr=1e-5``, ``steps=1000``,
    ``negative_guidance=1`` and ``method="esd-u"`` for nudity. ``run_esd`` also returns the loss
    curve and timing.
    """
    config = ESDConfig(
        concept=concept,
        method=method,
        negative_guidance=negative_guidance,
        start_guidance=start_guidance,
        steps=steps,
        lr=lr,
        ddim_steps=ddim_steps,
        seed=seed,
    )
    return run_esd(pipeline, config, num_threads=num_threads).unet


def _train(
    pipeline: Any,
    config: ESDConfig,
    callback: Callable[[int, float], None] | None,
    log_every: int,
) -> ESDOutput:
    frozen_unet = pipeline.unet
    device = frozen_unet.device
    trained_unet = copy.deepcopy(frozen_unet).eval()
    trained_unet.requires_grad_(False)
    parameters = esd_trainable_parameters(trained_unet, config.method)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(list(parameters.values()), lr=config.lr)

    with torch.no_grad():
        concept_embeds, null_embeds = pipeline.encode_prompt(
            config.concept, device, 1, True, negative_prompt=""
        )
    both_embeds = torch.cat([null_embeds, concept_embeds])

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(config.ddim_steps, device=device)
    sample_size = frozen_unet.config.sample_size
    latent_shape = (1, frozen_unet.config.in_channels, sample_size, sample_size)
    index_rng = random.Random(config.seed)
    noise_generator = torch.Generator(device="cpu").manual_seed(config.seed)

    logger.info(
        "ESD %s on %r: %d steps, %d trainable tensors (%d values), lr %g",
        config.method, config.concept, config.steps, len(parameters),
        sum(p.numel() for p in parameters.values()), config.lr,
    )
    losses: list[float] = []
    timesteps: list[int] = []
    start = time.perf_counter()
    for step in range(config.steps):
        step_index = index_rng.randrange(config.ddim_steps)
        noise = torch.randn(latent_shape, generator=noise_generator).to(device, frozen_unet.dtype)
        with torch.no_grad():
            x_t = _sample_until(
                trained_unet, scheduler, noise * scheduler.init_noise_sigma, both_embeds,
                step_index, config.start_guidance,
            )
            timestep = scheduler.timesteps[step_index]
            model_input = scheduler.scale_model_input(x_t, timestep)
            frozen_null, frozen_concept = frozen_unet(
                torch.cat([model_input, model_input]), timestep, encoder_hidden_states=both_embeds
            ).sample.chunk(2)
            target = frozen_null - config.negative_guidance * (frozen_concept - frozen_null)

        prediction = trained_unet(model_input, timestep, encoder_hidden_states=concept_embeds).sample
        loss = F.mse_loss(prediction.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        losses.append(loss.item())
        timesteps.append(int(timestep))
        if callback is not None:
            callback(step, losses[-1])
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            logger.info("ESD step %d/%d: mean loss %.5f", step + 1, config.steps, sum(recent) / len(recent))
    seconds = time.perf_counter() - start

    trained_unet.requires_grad_(False)
    return ESDOutput(
        unet=trained_unet.eval(),
        config=config,
        losses=tuple(losses),
        timesteps=tuple(timesteps),
        seconds=seconds,
        trained_parameters=tuple(parameters),
    )


def _sample_until(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    both_embeds: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """Run the first ``num_steps`` DDIM steps with classifier-free guidance; return x at ``timesteps[num_steps]``.

    ``both_embeds`` stacks the unconditional and the concept embeddings, shape (2, tokens, dim).
    """
    for timestep in scheduler.timesteps[:num_steps]:
        model_input = scheduler.scale_model_input(latents, timestep)
        noise_null, noise_concept = unet(
            torch.cat([model_input, model_input]), timestep, encoder_hidden_states=both_embeds
        ).sample.chunk(2)
        noise_pred = noise_null + guidance_scale * (noise_concept - noise_null)
        latents = scheduler.step(noise_pred, timestep, latents).prev_sample
    return latents


def save_esd_unet(output: ESDOutput, out_dir: Path | str, extra: dict[str, Any] | None = None) -> Path:
    """Write the fine-tuned UNet in diffusers format (safetensors) and ``esd_settings.json``.

    The folder loads with ``UNet2DConditionModel.from_pretrained(out_dir)`` and with
    ``baselines.weights.load_replacement``. The JSON record contains the settings, timing, the
    first and last losses, and ``extra`` (e.g. the base model folder).
    """
    out_dir = Path(out_dir)
    output.unet.save_pretrained(out_dir, safe_serialization=True)
    tail = max(1, len(output.losses) // 10)
    record = {
        "method": output.config.method,
        "settings": asdict(output.config),
        "train_seconds": round(output.seconds, 2),
        "loss_first_10pct_mean": _mean(output.losses[:tail]),
        "loss_last_10pct_mean": _mean(output.losses[-tail:]),
        "num_trained_tensors": len(output.trained_parameters),
        "torch_version": torch.__version__,
        **(extra or {}),
    }
    (out_dir / SETTINGS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    logger.info("saved the ESD UNet to %s", out_dir)
    return out_dir


def _mean(values: tuple[float, ...]) -> float | None:
    return sum(values) / len(values) if values else None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m baselines.esd",
        description="Erase a concept from a StableDiffusionPipeline's UNet with ESD and save the UNet.",
    )
    parser.add_argument("--model-dir", required=True, help="diffusers pipeline folder (text encoder included)")
    parser.add_argument("--concept", required=True, help="prompt naming the concept to erase")
    parser.add_argument("--method", choices=ESD_METHODS, default="esd-u", help="parameter group to train")
    parser.add_argument("--out", required=True, help="output folder for the UNet (config.json + safetensors)")
    parser.add_argument("--steps", type=int, default=ESDConfig.steps, help="optimiser steps (paper: 1000)")
    parser.add_argument("--lr", type=float, default=ESDConfig.lr, help="Adam learning rate (paper: 1e-5)")
    parser.add_argument("--negative-guidance", type=float, default=1.0, help="η of the target (paper: 1)")
    parser.add_argument("--start-guidance", type=float, default=3.0, help="CFG scale when sampling x_t")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the x_t sampling schedule")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and step-index streams")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ESD from the command line; see ``--help``."""
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
    config = ESDConfig(
        concept=args.concept,
        method=args.method,
        negative_guidance=args.negative_guidance,
        start_guidance=args.start_guidance,
        steps=args.steps,
        lr=args.lr,
        ddim_steps=args.ddim_steps,
        seed=args.seed,
    )
    output = run_esd(pipeline, config, num_threads=args.num_threads)
    save_esd_unet(output, args.out, extra=base_model_record(model_dir))


if __name__ == "__main__":
    main()
