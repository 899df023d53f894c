"""Loading published unlearned weights as replacement modules, safely and with provenance.

``load_replacement`` turns a local file or folder into a new UNet or text encoder for a
``StableDiffusionPipeline``; the pipeline itself is not modified. Nothing is downloaded. Accepted
inputs:

- a diffusers model folder (``config.json`` plus ``diffusion_pytorch_model.safetensors``,
  ``model.safetensors`` or a ``.bin``), or a pipeline folder that contains one as ``unet/`` or
  ``text_encoder/``;
- a ``.safetensors`` file with a state dict of the component in diffusers key naming. The keys
  may carry a ``unet.`` or ``text_encoder.`` prefix (a whole-pipeline state dict). The original
  Stable Diffusion (ldm) naming is accepted too: ``model.diffusion_model.*`` for the UNet and
  ``cond_stage_model.transformer.*`` for the CLIP text encoder. Those keys are converted with
  diffusers' ``convert_ldm_unet_checkpoint`` and ``convert_ldm_clip_checkpoint``;
- a pickled state dict (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), read only with
  ``torch.load(..., weights_only=True)``. A pickle that needs any other object is rejected, because
  unpickling it would run arbitrary code.

Published unlearned weights are examples of what to pass, after downloading them yourself:

======================  ==============  ==================================================================
Defense                 component       published form
======================  ==============  ==================================================================
ESD-u / ESD-x           ``unet``        the authors' diffusers script (``esd_sd.py`` in
                                        github.com/rohitgandikota/erasing) saves only the trained
                                        tensors, in diffusers naming, as ``.safetensors``: load with
                                        ``strict=False``
AdvUnlearn              ``text_encoder``  a ``CLIPTextModel`` folder per concept, e.g. the
                                        ``nudity_unlearned`` folder of the ``OPTML-Group/AdvUnlearn``
                                        snapshot
RECE, MACE, others      ``unet``        a UNet folder, a UNet state dict or a full ldm checkpoint
======================  ==============  ==================================================================

NOTE: the RECE and MACE rows are not checked against their releases; inspect a file's keys
(``safetensors.safe_open``) if loading reports a key mismatch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("unet", "text_encoder")
PICKLE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt")
FOLDER_WEIGHT_FILES: tuple[str, ...] = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
# Top-level module names of the ldm UNet; a state dict whose keys start with these is a UNet saved
# without the ``model.diffusion_model.`` prefix.
_LDM_UNET_ROOTS: tuple[str, ...] = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.")
_KEYS_SHOWN = 5


class WeightsLoadError(ValueError):
    """A replacement file or folder is missing, malformed or does not fit the pipeline's component."""


class UnsafeCheckpointError(WeightsLoadError):
    """A pickled checkpoint needs full unpickling, which can execute arbitrary code."""


@dataclass(frozen=True)
class ReplacementProvenance:
    """Provenance of a replacement module: its source file, hash and key format.

    Attributes:
        path: The file or folder passed to ``load_replacement`` (resolved).
        weights_file: The file the tensors were read from.
        sha256: SHA-256 of ``weights_file`` (hex).
        component: ``"unet"`` or ``"text_encoder"``.
        source_format: ``"diffusers-folder"``, ``"safetensors"`` or ``"torch-weights-only"``.
        key_format: ``"diffusers"`` or ``"ldm"`` (converted with diffusers' single-file helpers).
        num_tensors: Number of tensors loaded into the module.
        missing_keys: Keys of the module that the file does not provide (non-empty only with
            ``strict=False``); they keep the pipeline's values.
    """

    path: str
    weights_file: str
    sha256: str
    component: str
    source_format: str
    key_format: str
    num_tensors: int
    missing_keys: tuple[str, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "weights_file": self.weights_file,
            "sha256": self.sha256,
            "component": self.component,
            "source_format": self.source_format,
            "key_format": self.key_format,
            "num_tensors": self.num_tensors,
            "missing_keys": list(self.missing_keys),
        }


def file_sha256(path: Path | str) -> str:
    """Return the SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_replacement(
    pipeline: Any, path: Path | str, *, component: str = "unet", strict: bool = True
) -> torch.nn.Module:
    """Load replacement weights for ``pipeline.unet`` or ``pipeline.text_encoder``.

    The result is a deep copy of the pipeline's component with the loaded tensors, in eval mode,
    on the component's device and dtype. Its provenance is attached as the attribute
    ``replacement_provenance`` (a ``ReplacementProvenance``); ``replacement_provenance(module)``
    reads it.

    Args:
        pipeline: The base pipeline; its component fixes the expected keys and shapes.
        path: A diffusers folder, a ``.safetensors`` file or a pickled state dict (see the module
            docstring).
        component: ``"unet"`` or ``"text_encoder"``.
        strict: If true, every key of the component must be in the file. If false, missing keys
            keep the pipeline's values (partial checkpoints such as ESD's trained tensors only).
            Unexpected keys and shape mismatches are errors either way.

    Raises:
        WeightsLoadError: The path is missing or malformed, or its keys or shapes do not match.
        UnsafeCheckpointError: A pickle that ``torch.load(weights_only=True)`` rejects.
    """
    if component not in COMPONENTS:
        raise ValueError(f"invalid component {component!r}; expected one of {COMPONENTS}")
    base = getattr(pipeline, component, None)
    if not isinstance(base, torch.nn.Module):
        raise WeightsLoadError(f"the pipeline has no {component} module to replace (got {type(base).__name__})")
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise WeightsLoadError(f"replacement weights {path} not found")

    state_dict, weights_file, source_format = _read_state_dict(path, component, base)
    state_dict, key_format = _to_diffusers_keys(state_dict, base, component, path)
    missing = _check_keys(state_dict, base, component, path, strict)

    replacement = copy.deepcopy(base)
    base_state = base.state_dict()
    converted = {
        key: value.to(device=base_state[key].device, dtype=base_state[key].dtype) for key, value in state_dict.items()
    }
    replacement.load_state_dict(converted, strict=False)
    replacement.eval()
    provenance = ReplacementProvenance(
        path=str(path),
        weights_file=str(weights_file),
        sha256=file_sha256(weights_file),
        component=component,
        source_format=source_format,
        key_format=key_format,
        num_tensors=len(converted),
        missing_keys=tuple(missing),
    )
    replacement.replacement_provenance = provenance
    logger.info(
        "loaded %s replacement from %s (%s, %s keys, sha256 %s, %d tensors, %d missing)",
        component, weights_file, source_format, key_format, provenance.sha256[:12], len(converted), len(missing),
    )
    return replacement


def base_model_record(model_dir: Path | str) -> dict[str, Any]:
    """Describe the base pipeline folder that replacement weights were made from, for a settings record.

    Returns ``base_model_dir`` and, where the folder has ``unet/diffusion_pytorch_model.safetensors``,
    that file's SHA-256 as ``base_unet_sha256``: replacement UNets fit only that base UNet.
    """
    model_dir = Path(model_dir).resolve()
    record: dict[str, Any] = {"base_model_dir": str(model_dir)}
    unet_file = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    if unet_file.is_file():
        record["base_unet_sha256"] = file_sha256(unet_file)
    return record


def replacement_provenance(module: torch.nn.Module) -> ReplacementProvenance:
    """Return the provenance that ``load_replacement`` attached to ``module``."""
    provenance = getattr(module, "replacement_provenance", None)
    if not isinstance(provenance, ReplacementProvenance):
        raise ValueError(f"{type(module).__name__} was not loaded by load_replacement: it has no provenance")
    return provenance


def _read_state_dict(
    path: Path, component: str, base: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], Path, str]:
    if path.is_dir():
        weights_file = _folder_weights_file(path, component)
        _warn_on_config_differences(weights_file.parent / "config.json", base)
        return _read_file(weights_file)[0], weights_file, "diffusers-folder"
    state_dict, source_format = _read_file(path)
    return state_dict, path, source_format


def _warn_on_config_differences(config_file: Path, base: torch.nn.Module) -> None:
    # Some architecture settings (e.g. attention_head_dim) change the outputs without changing
    # any tensor shape, so the key and shape checks cannot catch them.
    try:
        folder_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsLoadError(f"{config_file} is not a readable JSON config: {error}") from error
    base_config = getattr(base, "config", None)
    if base_config is None:
        return
    base_values = base_config.to_dict() if hasattr(base_config, "to_dict") else dict(base_config)
    differing = sorted(
        key
        for key, value in folder_config.items()
        if not key.startswith("_") and key in base_values and _as_json(base_values[key]) != _as_json(value)
        and key not in ("architectures", "transformers_version", "dtype", "torch_dtype")
    )
    if differing:
        logger.warning(
            "%s differs from the pipeline's %s config in %s; the weights load into the pipeline's "
            "architecture, so check that these settings do not matter",
            config_file, type(base).__name__, differing,
        )


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _folder_weights_file(path: Path, component: str) -> Path:
    folder = path
    if not (folder / "config.json").is_file() and (folder / component / "config.json").is_file():
        folder = folder / component
    if not (folder / "config.json").is_file():
        raise WeightsLoadError(
            f"{path} is not a diffusers model folder: no config.json in it or in {component}/; pass the "
            "folder written by save_pretrained, or a single .safetensors file"
        )
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    sharded = sorted(folder.glob("*.safetensors.index.json"))
    if sharded:
        raise WeightsLoadError(
            f"{folder} contains sharded weights ({sharded[0].name}), which this loader does not read; "
            "merge the shards into one .safetensors file"
        )
    raise WeightsLoadError(f"{folder} has config.json but none of the weight files {FOLDER_WEIGHT_FILES}")


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), "safetensors"
        except SafetensorError as error:
            raise WeightsLoadError(f"{path} is not a valid safetensors file: {error}") from error
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), "torch-weights-only"
    raise WeightsLoadError(
        f"unsupported weights file {path.name!r}; expected .safetensors, one of {PICKLE_SUFFIXES}, "
        "or a diffusers folder"
    )


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it contains objects other than "
            f"tensors and plain containers ({error}). Unpickling such a file can execute arbitrary code, so "
            "it is rejected. If you trust its source, convert it once in an isolated environment: "
            "load it with torch.load(weights_only=False), keep only the tensor state dict, and write it "
            "with safetensors.torch.save_file(state_dict, 'weights.safetensors')."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsLoadError(f"{path} is not a readable torch checkpoint: {error}") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning/ldm checkpoints wrap the weights.
    if not isinstance(loaded, dict):
        raise WeightsLoadError(f"{path} contains a {type(loaded).__name__}, expected a state dict (a dict of tensors)")
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise WeightsLoadError(f"{path} contains a dict without tensors; expected a state dict")
    return tensors


def _to_diffusers_keys(
    state_dict: dict[str, torch.Tensor], base: torch.nn.Module, component: str, path: Path
) -> tuple[dict[str, torch.Tensor], str]:
    keys = list(state_dict)
    if component == "unet" and any(key.startswith((LDM_UNET_PREFIX, *_LDM_UNET_ROOTS)) for key in keys):
        return _convert_ldm_unet(state_dict, base, path), "ldm"
    if component == "text_encoder" and any(key.startswith(LDM_CLIP_PREFIX) for key in keys):
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        converted = _align_root_prefix(convert_ldm_clip_checkpoint(state_dict), base)
        return _drop_unknown_position_ids(converted, base), "ldm"

    prefix = f"{component}."
    if any(key.startswith(prefix) for key in keys):
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return _drop_unknown_position_ids(_align_root_prefix(state_dict, base), base), "diffusers"


def _align_root_prefix(state_dict: dict[str, torch.Tensor], base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Add or strip one leading key segment when that makes the file's keys match the module's.

    transformers 5 names the ``CLIPTextModel`` tensors without the ``text_model.`` prefix that
    checkpoints written by transformers 4 (and the ldm conversion) carry.
    """
    expected = set(base.state_dict())
    best = state_dict
    best_overlap = len(expected & set(state_dict))
    file_roots = {key.split(".", 1)[0] for key in state_dict if "." in key}
    model_roots = {key.split(".", 1)[0] for key in expected if "." in key}
    candidates = [
        {key.removeprefix(f"{root}."): value for key, value in state_dict.items()} for root in file_roots
    ] + [{f"{root}.{key}": value for key, value in state_dict.items()} for root in model_roots]
    for candidate in candidates:
        overlap = len(expected & set(candidate))
        if overlap > best_overlap:
            best, best_overlap = candidate, overlap
    return best


def _convert_ldm_unet(state_dict: dict[str, torch.Tensor], base: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not any(key.startswith(LDM_UNET_PREFIX) for key in state_dict):
        state_dict = {LDM_UNET_PREFIX + key: value for key, value in state_dict.items()}
    config = getattr(base, "config", None)
    if config is None:
        raise WeightsLoadError(f"{path} uses ldm key naming, and converting it needs the pipeline UNet's config")
    try:
        return convert_ldm_unet_checkpoint(state_dict, dict(config))
    except (KeyError, IndexError, ValueError) as error:
        raise WeightsLoadError(
            f"converting the ldm UNet keys of {path} failed ({type(error).__name__}: {error}); the file's "
            "architecture probably differs from the pipeline's UNet (wrong base model)"
        ) from error


def _drop_unknown_position_ids(state_dict: dict[str, torch.Tensor], base: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Older transformers versions saved the CLIP ``position_ids`` buffer; newer ones do not expect it.
    expected = base.state_dict()
    return {key: value for key, value in state_dict.items() if key in expected or not key.endswith("position_ids")}


def _check_keys(
    state_dict: dict[str, torch.Tensor], base: torch.nn.Module, component: str, path: Path, strict: bool
) -> list[str]:
    expected = base.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        key for key in set(state_dict) & set(expected) if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:_KEYS_SHOWN]}")
    if mismatched:
        examples = [
            f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
            for key in mismatched[:_KEYS_SHOWN]
        ]
        problems.append(f"{len(mismatched)} shape mismatches, e.g. {examples}")
    if missing and (strict or not set(state_dict) & set(expected)):
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:_KEYS_SHOWN]}")
    if problems:
        raise WeightsLoadError(
            f"{path} does not fit the pipeline's {component} ({type(base).__name__}): "
            + "; ".join(problems)
            + f". {_likely_cause(state_dict, component, missing, unexpected, mismatched)}"
        )
    return missing


def _likely_cause(
    state_dict: dict[str, torch.Tensor], component: str, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> str:
    other = "text_encoder" if component == "unet" else "unet"
    keys = list(state_dict)
    text_like = any(
        key.startswith(("text_model.", LDM_CLIP_PREFIX, "text_encoder.", "embeddings.", "encoder.layers.")) for key in keys
    )
    unet_like = any(key.startswith(("down_blocks.", "up_blocks.", "conv_in.", LDM_UNET_PREFIX, "unet.")) for key in keys)
    if (component == "unet" and text_like and not unet_like) or (component == "text_encoder" and unet_like and not text_like):
        return f"Likely cause: the file holds a {other}, not a {component}; pass component={other!r}."
    if mismatched:
        return "Likely cause: the weights were trained from a different base model (e.g. SD 2.x vs 1.x)."
    if missing and not unexpected:
        return (
            "Likely cause: a partial checkpoint that stores only the fine-tuned tensors (as ESD's scripts do); "
            "pass strict=False to keep the base model's values for the rest."
        )
    return "Likely cause: a different base model or a different component than the pipeline's."


def save_provenance(module: torch.nn.Module, path: Path | str) -> Path:
    """Write the module's ``ReplacementProvenance`` as JSON to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(replacement_provenance(module).to_dict(), indent=2, sort_keys=True) + "\n")
    return path
