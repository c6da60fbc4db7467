"""Visual inputs of the models: region features with their boxes, image patches, and how a region
maps onto the patches.

- `RegionEmbedding`: a detector region (feature + box) as one token.
- `PatchGrid`: what every model on patches shares (the grid, timm's `patch_embed.proj`, pixel
  normalisation, a patch's pixels as a target); `PatchEmbedding`: the image as 16x16 patches (ViT / ViLT): a convolution, learned position
  embeddings (resized bicubically when the model's grid differs from the one they were trained at),
  a visual [CLS]; its parameter names are timm's (`patch_embed.proj`, `pos_embed`, `cls_token`),
  so a ViT's embedding loads into it as it is.
- `normalise_pixels`, `patchify`, `standardise`: pixels to the model's input, a patch's pixels as
  a regression target, MAE's per-patch standardisation (the patch embedding's and VLMAE's alike).
- `box_patches`: the patches a region's box covers on the model's grid; `PatchRegions`: what a
  model on patches does with its regions (the patches under them, hiding them, pooling their states).
- `read_vit`: a ViT folder (timm or Hugging Face layout) as one canonical naming, timm's, which
  every family that starts from a ViT loads from (`read_vision_init`: model.vision_init's).
- `load_pixels`: JPEG bytes -> the model's square uint8 image (in the loader workers).

Geometry. The loader resizes every image to `image_size` x `image_size`, aspect not kept (as
ALBEF, VLMo and BLIP do at 384): every patch is image, none padding, and a box maps to the grid by
its coordinates as fractions of the original width and height, whatever size the shard stored the
image at. Pixels travel as uint8 HWC from the loader and are normalised on the device
(`normalise_pixels`): a quarter of float32's bytes through the workers' shared memory and
the copy to the device (docs/benchmarks.md, decode section).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp_train.backbone import read_weights

log = logging.getLogger(__name__)

# ImageNet's statistics: what a ViT trained on ImageNet (timm's and HF's default) normalises by
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# a box edge within this fraction of a patch of a patch boundary counts as on it (float noise)
_EDGE_TOLERANCE = 1e-4


class RegionEmbedding(nn.Module):
    """Linear(feature) + Linear(5-d location) + modality (token type 1) embedding, layer-normed."""

    def __init__(self, feature_dim: int, cfg, token_type: nn.Embedding):
        super().__init__()
        self.feature = nn.Linear(feature_dim, cfg.hidden_size)
        self.location = nn.Linear(5, cfg.hidden_size)
        self.token_type = token_type  # shared with the text embeddings: row 1 = the region modality
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, features, locations):
        x = self.feature(features) + self.location(locations) + self.token_type.weight[1]
        return self.dropout(self.LayerNorm(x))


class PatchProjection(nn.Module):
    """timm's `patch_embed.proj`: one convolution, a patch to a token."""

    def __init__(self, hidden: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, hidden, kernel_size=patch_size, stride=patch_size)


class PatchGrid(nn.Module):
    """What every model on patches shares: the image_size square cut into grid x grid patches of
    patch_size, timm's `patch_embed.proj` (a patch to a token) and the pixel statistics it
    normalises by (on the device). A subclass adds its own tokens ([CLS], positions, ...)."""

    def __init__(self, hidden: int, image_size: int, patch_size: int, mean, std):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"model.image_size={image_size} is not a multiple of model.patch_size={patch_size}")
        self.image_size, self.patch_size, self.grid = image_size, patch_size, image_size // patch_size
        self.patch_embed = PatchProjection(hidden, patch_size)
        # from the config (saved with the model), not the state dict
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise_pixels(pixels, self.mean, self.std)

    def project(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels uint8 [B, S, S, 3] -> each patch's token [B, N, D], row-major."""
        return self.patch_embed.proj(self.normalise(pixels)).flatten(2).transpose(1, 2)

    def pixel_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        """Each patch's normalised pixels, [B, N, patch * patch * 3], row-major as the patches."""
        return patchify(self.normalise(pixels), self.patch_size)


class PatchEmbedding(PatchGrid):
    """The image as [visual CLS] + grid x grid patch tokens: Conv(patch) + position embedding +
    modality (token type 1, shared with the regions), layer-normed as BERT's inputs are. A masked
    patch's projection is replaced by a learned `mask_token` (BEiT / SimMIM) before the position
    is added, so the model knows where the hidden patch is but not what it held."""

    def __init__(self, hidden: int, image_size: int, patch_size: int, token_type: nn.Embedding, eps: float,
                 dropout: float, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(hidden, image_size, patch_size, mean, std)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, hidden))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.token_type = token_type
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        for p in (self.cls_token, self.pos_embed, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)

    def settings(self) -> dict:
        """What a saved model's config records to rebuild it (`patch_settings` reads it back)."""
        return {"image_size": self.image_size, "patch_size": self.patch_size,
                "pixel_mean": self.mean.flatten().tolist(), "pixel_std": self.std.flatten().tolist()}

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def forward(self, pixels: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """pixels uint8 [B, S, S, 3]; masked [B, N] bool (True: hidden) -> [B, 1 + N, D]."""
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"pixels of {tuple(pixels.shape[1:3])}, but the patch embedding takes "
                             f"{self.image_size} x {self.image_size}")
        x = self.project(pixels)
        if masked is not None:
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        x = x + self.pos_embed + self.token_type.weight[1]
        return self.dropout(self.LayerNorm(x))

    def patch_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The regression target of a patch when a region has no feature: its normalised pixels,
        [B, N, patch * patch * 3], each patch standardised by its own mean and variance (MAE's
        norm_pix_loss, which its authors found to give better representations)."""
        return standardise(self.pixel_targets(pixels))

    def load_vit(self, weights: dict[str, torch.Tensor], where: str) -> None:
        """The patch projection, [CLS] and position embeddings from a ViT's canonical weights
        (`read_vit`); the position embeddings resized to this grid when the ViT's differs."""
        proj = weights.get("patch_embed.proj.weight")
        if proj is None or "pos_embed" not in weights:
            raise ValueError(f"{where}: no patch embedding (patch_embed.proj.weight, pos_embed) among its weights")
        ours = self.patch_embed.proj.weight
        if proj.shape[0] != ours.shape[0]:
            raise ValueError(f"{where}: a ViT of width {proj.shape[0]}, but the model's hidden size is {ours.shape[0]}")
        if proj.shape[1:] != ours.shape[1:]:
            raise ValueError(f"{where}: patches of {proj.shape[-1]} px, but model.patch_size={self.patch_size}")
        state = {"patch_embed.proj.weight": proj, "patch_embed.proj.bias": weights["patch_embed.proj.bias"],
                 "pos_embed": resize_pos_embed(weights["pos_embed"], self.grid, where)}
        if "cls_token" in weights:
            state["cls_token"] = weights["cls_token"]
        else:  # a ViT without a class token (global pooling): ours starts random
            state["pos_embed"] = torch.cat([self.pos_embed.detach()[:, :1], state["pos_embed"]], 1)
        with torch.no_grad():
            for name, value in state.items():
                self.get_parameter(name).copy_(value.reshape(self.get_parameter(name).shape))


def normalise_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (as the loader sends them) -> float [B, 3, H, W], (x/255 - mean) / std
    (mean, std [1, 3, 1, 1]): on the device, a quarter of float32's bytes through the loader."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, S, S] -> [B, N, patch * patch * 3]: each patch's pixels, patches row-major (the patch
    embedding's order), a patch's pixels row-major with the channels last."""
    b, p, g = images.shape[0], patch_size, images.shape[-1] // patch_size
    return images.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * 3)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Each row (the last dim) standardised by its own mean and variance: MAE's norm_pix_loss target."""
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()


class PatchRegions:
    """How a model that sees patches (`self.patches`, a PatchEmbedding; `self.visual` the
    model.visual it was built for) maps its regions onto them (a mixin of the single-stream and
    VLMo models): a region is the patches its box covers; masking it hides them; its state is the
    mean of their states (with its own region token too, `both`: the mean of the two)."""

    def region_patches(self, locations, region_mask):
        """[B, R, N] bool: the patches under each (real) region; `locations` as masking.locations."""
        return box_patches(locations, self.patches.grid) & region_mask.unsqueeze(-1)

    def masked_patches(self, locations, region_mask, masked_regions):
        """[B, N] bool: the patches under any masked region."""
        return (self.region_patches(locations, region_mask) & masked_regions.unsqueeze(-1)).any(1)

    def embed_patches(self, pixels, locations, region_mask, masked_regions=None):
        """[B, 1 + N, D]: the patch embedding's visual [CLS] + patches, those under `masked_regions`
        [B, R] hidden (its mask token)."""
        if pixels is None:
            raise ValueError(f"model.visual={self.visual} needs the images' pixels, and this batch has none")
        hidden = None if masked_regions is None else self.masked_patches(locations, region_mask, masked_regions)
        return self.patches(pixels, hidden)

    def region_states(self, patch_states, locations, region_mask, region_tokens=None):
        """[B, R, D]: each region's state from the patches' states [B, N, D] ([CLS] not among them),
        averaged with its own token's state [B, R, D] when the model has region tokens too."""
        pooled = pool_regions(patch_states, self.region_patches(locations, region_mask))
        return pooled if region_tokens is None else (region_tokens + pooled) / 2


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, where: str = "pos_embed") -> torch.Tensor:
    """[1, prefix + g*g, D] position embeddings (prefix: 1 for a [CLS], or 0) -> [1, prefix + grid*grid, D],
    the grid part resized bicubically as a g x g image (timm's resample_abs_pos_embed; a ViT trained
    at 224 used at 384: 14 x 14 -> 24 x 24). The prefix is kept as it is."""
    n = pos_embed.shape[1]
    for prefix in (1, 0):
        side = math.isqrt(n - prefix)
        if side * side == n - prefix and side > 0:
            break
    else:
        raise ValueError(f"{where}: {n} position embeddings are no square grid (with or without a [CLS])")
    if side == grid:
        return pos_embed
    head, grid_part = pos_embed[:, :prefix], pos_embed[:, prefix:]
    image = grid_part.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=side > grid)
    log.info("%s: position embeddings resized from %d x %d to %d x %d", where, side, side, grid, grid)
    return torch.cat([head, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], 1)


def box_patches(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """The patches each box covers: boxes [..., >=4] as (x1, y1, x2, y2) fractions of the image's
    width and height (`masking.locations`, whose 5th value, the area, is ignored) -> [..., grid*grid]
    bool, row-major (the patch embedding's order).

    A patch is covered when the box overlaps it with a positive area: masking a region then hides
    every pixel of it (a patch it only grazes hides some context too, which is the safe side: the
    model may not peek at the object through a patch half inside it). A box is clipped to the
    image first; one with no area left (a point, a line, a box beyond an edge, on a patch boundary)
    covers the patch that holds its clipped centre, so every region has at least one patch.
    Corners swapped (x2 < x1) are read as the same box."""
    boxes = boxes[..., :4].float()
    x1, x2 = torch.minimum(boxes[..., 0], boxes[..., 2]), torch.maximum(boxes[..., 0], boxes[..., 2])
    y1, y2 = torch.minimum(boxes[..., 1], boxes[..., 3]), torch.maximum(boxes[..., 1], boxes[..., 3])
    cells = torch.arange(grid, device=boxes.device)

    def covered(lo, hi):  # [...] fractions -> [..., grid] bool: the rows (or columns) the span covers
        lo, hi = lo.clamp(0, 1) * grid, hi.clamp(0, 1) * grid
        first = torch.floor(lo + _EDGE_TOLERANCE).clamp(0, grid - 1)
        last = (torch.ceil(hi - _EDGE_TOLERANCE) - 1).clamp(0, grid - 1)
        centre = torch.floor((lo + hi) / 2).clamp(0, grid - 1)
        empty = last < first
        first, last = torch.where(empty, centre, first), torch.where(empty, centre, last)
        return (cells >= first.unsqueeze(-1)) & (cells <= last.unsqueeze(-1))

    rows, cols = covered(y1, y2), covered(x1, x2)
    return (rows.unsqueeze(-1) & cols.unsqueeze(-2)).flatten(-2)


def pool_regions(patch_states: torch.Tensor, region_patches: torch.Tensor) -> torch.Tensor:
    """Each region's state as the mean of its patches' states: [B, N, D] x [B, R, N] -> [B, R, D]."""
    weights = region_patches.to(patch_states.dtype)
    return weights @ patch_states / weights.sum(-1, keepdim=True).clamp(min=1)


# -- pixels in the loader ------------------------------------------------------------------------

def load_pixels(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3] RGB, the whole image resized to the square
    (aspect not kept; see the module's note on geometry). JPEG through simplejpeg (libjpeg-turbo)
    at the smallest power-of-two DCT scale that still gives at least `size` on both sides, then
    one OpenCV resize (`resize_square`); the fastest pair measured (bench/decode.py,
    docs/benchmarks.md). Any other format through PIL. ValueError when the bytes are not an image."""
    try:
        array = _decode_jpeg(data, size) if data[:3] == b"\xff\xd8\xff" else _decode_other(data)
    except Exception as err:  # damaged bytes raise anything from the codec
        raise ValueError(f"undecodable image: {type(err).__name__}: {err}") from err
    return resize_square(array, size)


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> [size, size, 3]. Bilinear, or area averaging where a side shrinks by 2x or
    more (bilinear would alias there). After a reduced-scale JPEG decode the rest of the shrink is
    under 2x: area averaging at such a factor took 20x bilinear's time (1.3 ms vs 59 us, 384 x 288
    -> 224, bench/decode.py's machine) for no visible gain."""
    import cv2

    if array.shape[:2] == (size, size):
        return np.ascontiguousarray(array)
    far = array.shape[0] >= 2 * size or array.shape[1] >= 2 * size
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA if far else cv2.INTER_LINEAR)


def _decode_jpeg(data: bytes, size: int) -> np.ndarray:
    import simplejpeg

    # libjpeg-turbo decodes at a reduced DCT scale: the smallest of 1/8, 1/4, 1/2 that keeps both
    # sides >= size, else whole. Only powers of two: its other eighths (7/8 for 384 -> 224) run a
    # slower path than a whole decode and a resize (bench/decode.py, docs/benchmarks.md).
    width, height, _, _ = simplejpeg.decode_jpeg_header(data)
    factor = next((f for f in (8, 4, 2) if width >= f * size and height >= f * size), 1)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                  min_width=-(-width // factor), min_height=-(-height // factor))


def _decode_other(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# -- ViT folders ---------------------------------------------------------------------------------

def _hf_to_timm(name: str) -> str | None:
    """A Hugging Face ViT parameter name -> timm's (q/k/v are fused into qkv by the caller); None
    for what a timm ViT has no place for (the pooler)."""
    for prefix in ("vit.", ""):
        if name.startswith(tuple(prefix + part for part in ("embeddings.", "encoder.", "layers.", "layernorm.", "pooler."))):
            name = name[len(prefix):]
            break
    fixed = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.mask_token": "mask_token",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
             "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
    if name in fixed:
        return fixed[name]
    if name.startswith("pooler."):
        return None
    for layers in ("encoder.layer.", "layers."):  # the hub's files; transformers 5's module names
        if name.startswith(layers):
            break
    else:
        return None
    index, rest = name[len(layers):].split(".", 1)
    parts = {"layernorm_before.": "norm1.", "layernorm_after.": "norm2.", "attention.output.dense.": "attn.proj.",
             "intermediate.dense.": "mlp.fc1.", "output.dense.": "mlp.fc2.",
             "attention.attention.query.": "attn.q.", "attention.attention.key.": "attn.k.",
             "attention.attention.value.": "attn.v.", "attention.q_proj.": "attn.q.", "attention.k_proj.": "attn.k.",
             "attention.v_proj.": "attn.v.", "attention.o_proj.": "attn.proj.", "mlp.fc1.": "mlp.fc1.",
             "mlp.fc2.": "mlp.fc2."}
    for hf, timm in parts.items():
        if rest.startswith(hf):
            return f"blocks.{index}.{timm}{rest[len(hf):]}"
    return None


def patch_settings(section: dict) -> tuple[int, int, tuple, tuple]:
    """(image_size, patch_size, pixel mean, pixel std) from a saved model's config section, as
    `PatchEmbedding.settings` wrote it (the defaults for a model saved without patches)."""
    return (section.get("image_size", 384), section.get("patch_size", 16),
            tuple(section.get("pixel_mean", IMAGENET_MEAN)), tuple(section.get("pixel_std", IMAGENET_STD)))


def pixel_stats(vit) -> tuple[tuple, tuple]:
    """The pixel mean and std a ViT was trained with (`read_vit`'s info), else ImageNet's."""
    return (tuple(vit[1]["mean"]), tuple(vit[1]["std"])) if vit else (IMAGENET_MEAN, IMAGENET_STD)


def read_vision_init(cfg_model):
    """`read_vit` of `model.vision_init`, or None: none named, or model.visual=regions, which has no
    patch embedding to start from it (warned: the setting is not silently dropped)."""
    if not cfg_model.vision_init:
        return None
    if cfg_model.visual == "regions":
        log.warning("model.vision_init %s is not used: model.visual=regions has no patch embedding", cfg_model.vision_init)
        return None
    return read_vit(cfg_model.vision_init)


def read_vit(folder: str, what: str = "model.vision_init") -> tuple[dict[str, torch.Tensor], dict]:
    """(weights under timm's names, info) of a ViT folder, timm's layout (`patch_embed.proj.weight`,
    `pos_embed`, `cls_token`, `blocks.N.attn.qkv`, ..., a config.json with `pretrained_cfg`) or
    Hugging Face's (`vit.embeddings.patch_embeddings.projection.weight`, `vit.encoder.layer.N...`,
    config.json + preprocessor_config.json); weights as model.safetensors or pytorch_model.bin
    (read with weights_only). HF's separate query/key/value become timm's fused `attn.qkv`.

    info: image_size, patch_size, hidden, layers, heads, mlp (the MLP width), eps, mean, std: what
    the folder's config says, else read off the weights (ImageNet's mean/std by default)."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} {folder}: no such folder")
    raw = read_weights(folder, what)
    config = _json(os.path.join(folder, "config.json"))
    if "patch_embed.proj.weight" in raw:  # timm
        weights = dict(raw)
    elif any(_hf_to_timm(k) == "patch_embed.proj.weight" for k in raw):
        weights, dropped = {}, []
        for name, tensor in raw.items():
            canonical = _hf_to_timm(name)
            if canonical is None:
                dropped.append(name)
            else:
                weights[canonical] = tensor
        if dropped:
            log.info("%s %s: not part of a timm ViT, left out: %s", what, folder, ", ".join(sorted(dropped)[:5]))
        for qkv in sorted({k.rsplit(".attn.", 1)[0] for k in weights if ".attn.q." in k}):
            for kind in ("weight", "bias"):
                parts = [weights.pop(f"{qkv}.attn.{p}.{kind}", None) for p in "qkv"]
                if all(p is not None for p in parts):
                    weights[f"{qkv}.attn.qkv.{kind}"] = torch.cat(parts, 0)
                elif any(p is not None for p in parts):
                    raise ValueError(f"{what} {folder}: {qkv} lacks a query, key or value {kind}")
    else:
        raise ValueError(f"{what} {folder}: not a ViT (no patch_embed.proj.weight, timm's name, nor "
                         "vit.embeddings.patch_embeddings.projection.weight, Hugging Face's)")
    return weights, _vit_info(weights, config, _json(os.path.join(folder, "preprocessor_config.json")))


def _json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _vit_info(weights: dict[str, torch.Tensor], config: dict, preprocessor: dict) -> dict:
    proj = weights["patch_embed.proj.weight"]
    layers = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
    pretrained = config.get("pretrained_cfg", {})  # timm
    n = weights["pos_embed"].shape[1] if "pos_embed" in weights else 0
    side = math.isqrt(max(n - ("cls_token" in weights), 0))
    image_size = config.get("image_size") or (pretrained.get("input_size") or [0, 0, 0])[-1] or side * proj.shape[-1]
    mlp = weights.get("blocks.0.mlp.fc1.weight")
    return {"image_size": int(image_size), "patch_size": int(proj.shape[-1]), "hidden": int(proj.shape[0]),
            "layers": layers, "heads": int(config.get("num_attention_heads") or config.get("num_heads") or 0),
            "mlp": int(mlp.shape[0]) if mlp is not None else 0,
            "eps": float(config.get("layer_norm_eps", 1e-6)),
            "mean": tuple(float(v) for v in preprocessor.get("image_mean") or pretrained.get("mean") or IMAGENET_MEAN),
            "std": tuple(float(v) for v in preprocessor.get("image_std") or pretrained.get("std") or IMAGENET_STD)}
