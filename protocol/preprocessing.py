"""Preprocessing step specs: the one typed home of the steps a manifest and a profile list.

A step is a small pydantic model with a literal ``op`` (the discriminator of :data:`PreprocessStep`);
the same list travels in ``Manifest.preprocessing`` (so a box serves a model with the steps it was
trained with) and is written in a firmware profile's ``preprocessing``. What a step *does* lives
in ``learning/transforms.py``, shared by training and inference.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "OPS",
    "DicomRescale",
    "InvertMonochrome1",
    "Normalize",
    "PreprocessStep",
    "Resize",
    "ScaleTo01",
    "SelectFrame",
    "ToGrayscale",
    "ToRGB",
    "Window",
    "parse_steps",
]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomRescale(_Step):
    """The DICOM Modality LUT (Rescale Slope/Intercept, or the LUT itself)."""

    op: Literal["dicom_rescale"] = "dicom_rescale"


class Window(_Step):
    """Explicit center/width, else the file's VOI LUT / window, else min-max; to [0, 1]."""

    op: Literal["window"] = "window"
    center: float | None = None
    width: float | None = Field(None, gt=0)


class InvertMonochrome1(_Step):
    """Invert MONOCHROME1 images so that high values are white."""

    op: Literal["invert_monochrome1"] = "invert_monochrome1"


class SelectFrame(_Step):
    """One frame of a multi-frame image: ``"middle"`` or an index (negative counts from the end)."""

    op: Literal["select_frame"] = "select_frame"
    index: int | Literal["middle"] = "middle"


class ToGrayscale(_Step):
    """ITU-R BT.601 luma of an RGB image."""

    op: Literal["to_grayscale"] = "to_grayscale"


class ToRGB(_Step):
    """Grey replicated to three channels."""

    op: Literal["to_rgb"] = "to_rgb"


class Resize(_Step):
    """Bilinear resize to ``height`` x ``width``."""

    op: Literal["resize"] = "resize"
    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)


class ScaleTo01(_Step):
    """Stored values to [0, 1] by their nominal range (uint8: /255), else min-max."""

    op: Literal["scale_to_unit"] = "scale_to_unit"


class Normalize(_Step):
    """``(x - mean) / std`` per channel."""

    op: Literal["normalize"] = "normalize"
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]


#: One step, told apart by ``op``.
PreprocessStep = Annotated[
    DicomRescale | Window | InvertMonochrome1 | SelectFrame | ToGrayscale | ToRGB | Resize | ScaleTo01 | Normalize,
    Field(discriminator="op"),
]

#: Every ``op`` name, in the order of the union.
OPS: tuple[str, ...] = (
    "dicom_rescale", "window", "invert_monochrome1", "select_frame", "to_grayscale", "to_rgb", "resize",
    "scale_to_unit", "normalize",
)

_STEPS: TypeAdapter[list[PreprocessStep]] = TypeAdapter(list[PreprocessStep])


def parse_steps(data: object) -> list[PreprocessStep]:
    """Validate a list of step mappings (from YAML or JSON); pydantic's ``ValidationError`` if malformed."""
    return _STEPS.validate_python(data)
