"""Real MS-COCO images for the COCO caption suites, loaded from a user folder by COCO image id.

The caption suites ship with the package (``coco-10k``, ``coco-30k``, ``coco-30k-10k``), the images
do not. In ``coco-30k`` and ``coco-30k-10k`` the image id is the ``coco_id`` column and
``case_number`` is a row number. In ``coco-10k`` the image id is ``case_number``, zero-padded to 12
digits. A folder may hold the 2014 file names (``COCO_val2014_000000123456.jpg``,
``COCO_train2014_...``) or the 2017 names (``000000123456.jpg``). The 2017 release keeps the 2014
ids, so images from train2017 and val2017 together cover val2014.

NOTE: that every id of the shipped suites is a val2014 id is how the suites' sources describe
them; this module does not check it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.suites import PromptRow, Suite, load_suite

logger = logging.getLogger(__name__)

_IMAGE_NAME = re.compile(r"^(?:COCO_(?:train|val)2014_)?(\d{12})\.(?:jpe?g|png)$", re.IGNORECASE)
_PADDED_ID = re.compile(r"^\d{12}$")
_MISSING_IDS_LISTED = 10


class MissingReferenceImagesError(FileNotFoundError):
    """Some COCO image ids of a suite have no image file in the user's folder."""


def coco_image_id(row: PromptRow) -> int:
    """Return the COCO image id of a caption row.

    The id is the row's ``coco_id`` column, else its case id when that is a 12-digit zero-padded
    number (``coco-10k``).

    Raises:
        ValueError: the row has neither.
    """
    value = row.attributes.get("coco_id")
    if value is not None and str(value).strip().isdigit():
        return int(str(value).strip())
    if _PADDED_ID.match(row.case_id):
        return int(row.case_id)
    raise ValueError(
        f"COCO reference: row {row.index} (case id {row.case_id!r}) has no COCO image id; expected "
        "a numeric coco_id column or a 12-digit zero-padded case_number"
    )


def index_coco_images(image_dir: Path, recursive: bool = False) -> dict[int, Path]:
    """Map COCO image ids to the image files in ``image_dir`` (2014 or 2017 file names).

    When two files carry the same id, the first in sorted path order is kept.
    """
    pattern = "**/*" if recursive else "*"
    found: dict[int, Path] = {}
    duplicates = 0
    for path in sorted(image_dir.glob(pattern)):
        match = _IMAGE_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        image_id = int(match.group(1))
        if image_id in found:
            duplicates += 1
            continue
        found[image_id] = path
    if duplicates:
        logger.warning(
            "COCO reference: %d image ids in %s have more than one file; the first in sorted path "
            "order is used.",
            duplicates,
            image_dir,
        )
    return found


def load_image(path: Path, size: int | None) -> Image.Image:
    """Open an RGB image. With ``size``, resize its shorter side to ``size`` (bicubic) and center-crop to a square."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if size is None:
        return image
    width, height = image.size
    scale = size / min(width, height)
    resized_width = max(size, round(width * scale))
    resized_height = max(size, round(height * scale))
    image = image.resize((resized_width, resized_height), Image.Resampling.BICUBIC)
    left = (resized_width - size) // 2
    top = (resized_height - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class CocoReferenceImages:
    """Real COCO image files for the rows of a caption suite, in suite order.

    ``image_ids[i]`` and ``paths[i]`` belong to the suite's i-th row with a distinct image id.
    """

    suite_name: str
    image_dir: Path
    image_ids: tuple[int, ...]
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def reference_name(self, size: int | None) -> str:
        """Return the name to record as an FID/KID reference set, including the preprocessing."""
        preprocessing = "original size" if size is None else f"bicubic shorter side {size}, center crop {size}x{size}"
        return f"{self.suite_name} MS-COCO images ({len(self)}; {preprocessing})"

    def batches(self, batch_size: int, size: int | None = 512) -> Iterator[torch.Tensor]:
        """Yield (B, 3, size, size) float32 batches in [0, 1], in suite order.

        ``size`` None keeps every image at its own size, so every batch contains one image.
        """
        if batch_size < 1:
            raise ValueError(f"COCO reference: batch_size={batch_size} is invalid; expected a positive integer")
        step = 1 if size is None else batch_size
        for start in range(0, len(self.paths), step):
            arrays = [
                np.asarray(load_image(path, size), dtype=np.float32) / 255.0
                for path in self.paths[start : start + step]
            ]
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def coco_reference_images(
    image_dir: str | os.PathLike[str],
    suite: str | Suite = "coco-10k",
    *,
    limit: int | None = None,
    recursive: bool = False,
) -> CocoReferenceImages:
    """Find the real COCO images of a caption suite's rows in ``image_dir``.

    ``suite`` is a suite name or a loaded ``Suite``. ``limit`` keeps the first rows of the suite.
    A suite row whose image id repeats an earlier row's is counted once.

    Raises:
        FileNotFoundError: ``image_dir`` is not a folder.
        MissingReferenceImagesError: some ids have no file. The message gives how many, the first
            ids and where to get the images.
    """
    folder = Path(image_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO reference: image folder {folder} not found")
    loaded = load_suite(suite, limit=limit) if isinstance(suite, str) else suite
    rows = loaded.rows if limit is None or isinstance(suite, str) else loaded.rows[:limit]

    image_ids = list(dict.fromkeys(coco_image_id(row) for row in rows))
    available = index_coco_images(folder, recursive=recursive)
    missing = [image_id for image_id in image_ids if image_id not in available]
    if missing:
        listed = ", ".join(f"{image_id:012d}" for image_id in missing[:_MISSING_IDS_LISTED])
        raise MissingReferenceImagesError(
            f"COCO reference: {len(missing)} of {len(image_ids)} images of suite {loaded.name!r} are "
            f"missing from {folder} (first ids: {listed}). Expected files named "
            "COCO_val2014_<12-digit id>.jpg or <12-digit id>.jpg"
            f"{' in it or its subfolders' if recursive else ' directly in it'}. The images are the "
            "MS-COCO 2014 validation images (val2014 from cocodataset.org; train2017 and val2017 "
            "together hold the same ids under the 2017 names)"
        )

    logger.info("COCO reference: %d images of suite %r found in %s.", len(image_ids), loaded.name, folder)
    return CocoReferenceImages(
        suite_name=loaded.name,
        image_dir=folder,
        image_ids=tuple(image_ids),
        paths=tuple(available[image_id] for image_id in image_ids),
    )
