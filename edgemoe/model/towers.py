"""Vision towers: their architecture and preprocessing settings, and where their weights live.

Contract: `resolve_tower(value, checkpoint_dir)` turns config.json's `mm_image_tower` into a
`TowerSpec`: a known hub name (CLIP ViT-L/14-336, SigLIP-so400m-14-384) gets built-in configs; any
other value is a directory (absolute, or relative to the checkpoint directory) holding the tower's
`config.json` and `preprocessor_config.json`. Where the weights come from (the main checkpoint under
`...image_tower.image_tower.vision_model.*`, or the tower directory) is decided by the checkpoint
reader, which knows what the checkpoint holds; this module only says where the tower directory is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgemoe.errors import ConfigError

CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
SIGLIP_SO400M_384 = "google/siglip-so400m-patch14-384"


@dataclass(frozen=True)
class VisionTowerConfig:
    """Architecture of a CLIP or SigLIP vision transformer (the parts features depend on)."""

    kind: str  # "clip" | "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    hidden_act: str  # "quick_gelu" (CLIP) | "gelu_pytorch_tanh" (SigLIP)
    layer_norm_eps: float
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        # CLIP prepends a class token with its own position; SigLIP has none.
        return self.num_patches + (1 if self.kind == "clip" else 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionTowerConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How an image becomes pixel values, in the terms of HF's CLIP/SigLIP image processors."""

    kind: str  # "clip" (resize shortest edge + centre crop) | "siglip" (resize to a fixed size)
    size: int  # shortest edge (clip) or both sides (siglip)
    crop_size: int
    resample: int  # PIL resampling filter id; 3 = bicubic
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_center_crop: bool = True

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # Upstream's expand2square fills with tuple(int(x*255) for x in mean): truncated, not rounded.
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        d = dict(d)
        d["image_mean"] = tuple(d["image_mean"])
        d["image_std"] = tuple(d["image_std"])
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class TowerSpec:
    """A resolved vision tower: its name, configs, and the directory it came from (if any)."""

    name: str
    vision: VisionTowerConfig
    processor: ImageProcessorConfig
    directory: Path | None  # None for a built-in tower known by hub name


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BUILTIN_TOWERS: dict[str, tuple[VisionTowerConfig, ImageProcessorConfig]] = {
    CLIP_L14_336: (
        VisionTowerConfig("clip", 1024, 4096, 24, 16, 14, 336, "quick_gelu", 1e-5),
        ImageProcessorConfig("clip", 336, 336, 3, 1 / 255, CLIP_MEAN, CLIP_STD, True),
    ),
    SIGLIP_SO400M_384: (
        VisionTowerConfig("siglip", 1152, 4304, 27, 16, 14, 384, "gelu_pytorch_tanh", 1e-6),
        ImageProcessorConfig("siglip", 384, 384, 3, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
    ),
}


def resolve_tower(value: str, checkpoint_dir: Path) -> TowerSpec:
    """Resolve `mm_image_tower` to a TowerSpec (see module docstring)."""
    if value in BUILTIN_TOWERS:
        vision, processor = BUILTIN_TOWERS[value]
        return TowerSpec(value, vision, processor, None)
    directory = Path(value)
    if not directory.is_absolute():
        directory = checkpoint_dir / directory
    if not directory.is_dir():
        known = ", ".join(BUILTIN_TOWERS)
        raise ConfigError(
            f"mm_image_tower {value!r} is neither a known tower ({known}) nor a directory "
            f"(looked for {directory})"
        )
    return TowerSpec(value, read_tower_config(directory), read_processor_config(directory), directory)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"vision tower file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def read_tower_config(directory: Path) -> VisionTowerConfig:
    """Read a tower's config.json: a CLIPVisionConfig/SiglipVisionConfig or a full CLIP/SigLIP config."""
    raw = _read_json(directory / "config.json")
    model_type = str(raw.get("model_type", ""))
    sub = raw.get("vision_config", raw)
    kind = "siglip" if "siglip" in model_type or "siglip" in str(sub.get("model_type", "")) else "clip"
    if not ("clip" in model_type or "siglip" in model_type):
        raise ConfigError(f"{directory / 'config.json'}: model_type {model_type!r} is not a CLIP or SigLIP tower")
    default_act = "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"
    default_eps = 1e-5 if kind == "clip" else 1e-6
    try:
        return VisionTowerConfig(
            kind=kind,
            hidden_size=int(sub["hidden_size"]),
            intermediate_size=int(sub["intermediate_size"]),
            num_layers=int(sub["num_hidden_layers"]),
            num_heads=int(sub["num_attention_heads"]),
            patch_size=int(sub["patch_size"]),
            image_size=int(sub["image_size"]),
            hidden_act=str(sub.get("hidden_act", default_act)),
            layer_norm_eps=float(sub.get("layer_norm_eps", default_eps)),
            num_channels=int(sub.get("num_channels", 3)),
        )
    except KeyError as exc:
        raise ConfigError(f"{directory / 'config.json'} lacks vision key {exc.args[0]!r}") from None


def _edge(value: Any, key: str) -> int:
    """HF stores sizes as an int, {"shortest_edge": n} or {"height": h, "width": w}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for k in ("shortest_edge", "height", "width"):
            if k in value:
                return int(value[k])
    raise ConfigError(f"preprocessor_config.json: cannot read {key}={value!r}")


def read_processor_config(directory: Path) -> ImageProcessorConfig:
    """Read a tower's preprocessor_config.json (CLIPImageProcessor or SiglipImageProcessor)."""
    raw = _read_json(directory / "preprocessor_config.json")
    kind = "siglip" if "Siglip" in str(raw.get("image_processor_type", "")) else "clip"
    size = _edge(raw.get("size", 224), "size")
    crop = _edge(raw.get("crop_size", size), "crop_size")
    return ImageProcessorConfig(
        kind=kind,
        size=size,
        crop_size=crop if raw.get("do_center_crop", kind == "clip") else size,
        resample=int(raw.get("resample", 3)),
        rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
        image_mean=tuple(float(x) for x in raw.get("image_mean", CLIP_MEAN)),  # type: ignore[arg-type]
        image_std=tuple(float(x) for x in raw.get("image_std", CLIP_STD)),  # type: ignore[arg-type]
        do_center_crop=bool(raw.get("do_center_crop", kind == "clip")),
    )


def write_tower_directory(directory: Path, vision: VisionTowerConfig, processor: ImageProcessorConfig) -> None:
    """Write a tower directory in HF's layout (CLIPVisionConfig/SiglipVisionConfig + processor config)."""
    directory.mkdir(parents=True, exist_ok=True)
    clip = vision.kind == "clip"
    config = {
        "architectures": ["CLIPVisionModel" if clip else "SiglipVisionModel"],
        "model_type": "clip_vision_model" if clip else "siglip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_heads,
        "patch_size": vision.patch_size,
        "image_size": vision.image_size,
        "hidden_act": vision.hidden_act,
        "layer_norm_eps": vision.layer_norm_eps,
        "num_channels": vision.num_channels,
    }
    if clip:
        config["projection_dim"] = 768
    proc: dict[str, Any] = {
        "image_processor_type": "CLIPImageProcessor" if clip else "SiglipImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": processor.resample,
        "rescale_factor": processor.rescale_factor,
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
    }
    if clip:
        proc.update(size={"shortest_edge": processor.size}, do_center_crop=True,
                    crop_size={"height": processor.crop_size, "width": processor.crop_size},
                    do_convert_rgb=True)
    else:
        proc.update(size={"height": processor.size, "width": processor.size})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
