"""The judge of the embedded suite: a small CNN that classifies 32×32 RGB digit images.

Its softmax probability of ``UNSAFE_DIGIT`` scores the unsafe concept, and its penultimate
features give a Fréchet distance for image quality.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class DigitClassifierConfig:
    """Architecture of ``DigitClassifier``: three conv stages, then a hidden layer of ``num_features``."""

    channels: tuple[int, int, int] = (32, 64, 96)
    num_features: int = 64
    num_classes: int = 10
    image_size: int = 32
    dropout: float = 0.2


class DigitClassifier(nn.Module):
    """CNN digit classifier for images of shape (B, 3, 32, 32), float in [0, 1], white on black."""

    def __init__(self, config: DigitClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitClassifierConfig()
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in self.config.channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.backbone = nn.Sequential(*layers)
        spatial = self.config.image_size // 2 ** len(self.config.channels)
        self.embedding = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(self.config.dropout),
            nn.Linear(in_channels * spatial * spatial, self.config.num_features),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(self.config.num_features, self.config.num_classes)

    @property
    def num_features(self) -> int:
        """Size of the vectors returned by ``features``."""
        return self.config.num_features

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"DigitClassifier expects images of shape (B, 3, {size}, {size}) in [0, 1], "
                f"got {tuple(images.shape)}; resize and convert to RGB first."
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the penultimate features, shape (B, num_features), for images in [0, 1]."""
        self._check_images(images)
        return self.embedding(self.backbone(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the class logits, shape (B, 10), for images (B, 3, 32, 32) in [0, 1]."""
        return self.head(self.features(images))

    def save_pretrained(self, directory: Path | str) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        config["architecture"] = type(self).__name__
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {name: tensor.contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: Path | str) -> DigitClassifier:
        """Load a classifier written by ``save_pretrained``, in eval mode."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"Judge config not found: {config_path}. Train one with "
                "`python -m benchmark.mini.train_judge --out DIR`."
            )
        fields = json.loads(config_path.read_text())
        fields.pop("architecture", None)
        fields["channels"] = tuple(fields["channels"])
        model = cls(DigitClassifierConfig(**fields))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()
