"""VLMAE (`model.arch=vlmae`): the Vision-Language Masked AutoEncoder, on our corpus.

An ALBEF-shaped model (the paper's Sec. 3 and Table 9):
- image encoder: a ViT (pre-norm blocks, timm's parameter names) over [I_CLS] + the image's
  *visible* elements only: MAE's per-sample random masking hides `model.mask_ratio` of them
  (0.5 the paper's choice, 0.75 available). The elements are region features (this corpus's
  shards: `Linear(feature) + Linear(box)`, the region-feature variant) or 16x16 patches;
- text encoder: the first BERT layers; fusion learner: the top `model.fusion_layers` BERT layers
  (0: half of them; BERT-base 6 + 6 as the paper, the bundled 6-layer MiniLM 3 + 3), each with a
  cross-attention to the image states after its self-attention (HF's `crossattention` names);
- image decoder (`model.decoder_layers` x `model.decoder_hidden`, the paper's 4 x 512): over the
  visible image states with a mask token at each hidden element (plus its position: the box for a
  region) and the text encoder's states, predicting each hidden element (its features or pixels);
- momentum (EMA, `objectives.momentum`) copies of the image encoder, the text encoder and the two
  contrast projections: no gradient, updated at the start of every training forward (as ALBEF).

The pair objectives (`Task.IMAGE_TEXT`, `vl`: the image and its retrieved sentence), named
per-sample losses: `rmim`, `ifr`, `itc`, `itm`, `mlm` (docs/trainer.md, "VLMAE"). The μ-VLA
granularities (region-tag, region-phrase, image-sentence) run on the fusion learner through `forward`.
"""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp_train import pretrained
from vlp_train.backbone import BertAttention, BertBackbone, BertLayer, PretrainingHeads, bert_config, call_layer, \
    feed_forward, load_bert_init
from vlp_train.families import Family, clean_pair_match_probability, register
from vlp_train.masking import retrieved_text_keys, text_key
from vlp_train.objectives.contrastive import contrast_feature
from vlp_train.objectives.image_sentence import image_sentence_losses
from vlp_train.objectives.region_phrase import region_phrase_losses
from vlp_train.objectives.region_tag import region_tag_losses
from vlp_train.tasks import Task
from vlp_train.visual import PatchGrid, standardise

log = logging.getLogger(__name__)

ARCH = "vlmae"
# the task whose view and objectives are VLMAE's own: the family's image-text task
# (objectives.image_text switches it, as it does VLMo's; objectives.weight_image_text weighs it by
# the curriculum's w_ITM)
PAIR_TASK = Task.IMAGE_TEXT
VIT_EPS = 1e-6


# -- the blocks --------------------------------------------------------------------------------

class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)


class _ViTAttention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)


class ViTBlock(nn.Module):
    """A pre-norm transformer block with timm's names (`norm1`, `attn.qkv`, `attn.proj`, `norm2`,
    `mlp.fc1`, `mlp.fc2`), so a ViT's blocks load by name; attention by SDPA with a padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=VIT_EPS)
        self.attn = _ViTAttention(width)
        self.norm2 = nn.LayerNorm(width, eps=VIT_EPS)
        self.mlp = _Mlp(width, mlp_ratio * width)

    def forward(self, x, attn_mask):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.attn.proj(ctx.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class FusionLayer(BertLayer):
    """A BERT layer with a cross-attention to the image states between its self-attention and its
    FFN (HF BertLayer's `crossattention`, as ALBEF's fusion layers); key/value take the image width."""

    def __init__(self, cfg, image_width: int):
        super().__init__(cfg)
        self.crossattention = BertAttention(cfg)
        self.crossattention.self.key = nn.Linear(image_width, cfg.hidden_size)
        self.crossattention.self.value = nn.Linear(image_width, cfg.hidden_size)

    def forward(self, x, attn_mask, image=None, image_mask=None):
        x = self.attention(x, attn_mask)
        if image is not None:
            x = self.crossattention(x, image_mask, image)
        return feed_forward(self, x)


class RegionTokens(nn.Module):
    """The image's elements as region features: Linear(feature) + Linear(5-d box)."""

    def __init__(self, feature_dim: int, width: int):
        super().__init__()
        self.feature = nn.Linear(feature_dim, width)
        self.location = nn.Linear(5, width)

    def forward(self, view, features=None):
        return self.feature(view["features"] if features is None else features) + self.location(view["locations"])

    def mask(self, view):
        """[B, N] True for a real element (regions are padded to the batch's most)."""
        return view["region_mask"]

    def positions(self, view):
        """[B, N, 5]: where each element is, as masking.locations gives a box."""
        return view["locations"]

    def targets(self, view):
        """What RMIM reconstructs: the regions' original features (MRFR's target)."""
        return view["features"]


class PatchTokens(PatchGrid):
    """The image's elements as patch_size patches of the image_size square image (`pixels`, uint8
    [B, S, S, 3] from the loader): timm's `patch_embed.proj` and `pos_embed` (whose first row is the
    [CLS]'s), so a ViT's embedding loads by name. Pixels are normalised here, on the device."""

    def __init__(self, width: int, image_size: int, patch_size: int, mean, std):
        super().__init__(width, image_size, patch_size, mean, std)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.register_buffer("cells", torch.from_numpy(patch_cells(self.grid)), persistent=False)

    def forward(self, view, features=None):
        if features is not None and features is not view.get("features"):
            raise ValueError("vlmae on patches: region masking of the μ-VLA granularities is not supported")
        pixels = view.get("pixels")
        if pixels is None:
            raise ValueError("model.visual=patches needs the images' pixels, and this batch has none")
        x = self.project(pixels)
        return x + self.pos_embed[:, 1:].to(x.dtype)

    @property
    def cls_position(self):
        return self.pos_embed[:, :1]

    def mask(self, view):
        pixels = view["pixels"]
        return torch.ones(pixels.shape[0], self.grid ** 2, dtype=torch.bool, device=pixels.device)

    def positions(self, view):
        return self.cells.expand(view["pixels"].shape[0], -1, -1)

    def targets(self, view):
        """Each patch's (normalised) pixels, [B, N, patch * patch * 3], row-major as the patches."""
        return self.pixel_targets(view["pixels"])


def patch_cells(grid: int) -> np.ndarray:
    """[grid * grid, 5]: each patch as a box ([x1, y1, x2, y2] fractions of the image, area), row-major."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    x1, y1 = cols.ravel() / grid, rows.ravel() / grid
    return np.stack([x1, y1, x1 + 1 / grid, y1 + 1 / grid, np.full(grid * grid, 1 / grid ** 2)], 1).astype(np.float32)


class ImageEncoder(nn.Module):
    """ViT over [I_CLS] + the image's elements, or only the visible ones (`visible` [B, K] indices,
    `visible_mask` [B, K]): MAE's encoder. Position information is in the element embeddings
    (a region's box), added before masking as MAE does."""

    def __init__(self, tokens: nn.Module, width: int, layers: int, heads: int):
        super().__init__()
        self.tokens = tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(ViTBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=VIT_EPS)
        self.call_layer = call_layer

    def forward(self, view, visible: bool = False, features=None):
        """-> (states [B, 1 + N or K, W], mask [B, 1 + N or K]); position 0 is [I_CLS]."""
        x, mask = self.tokens(view, features), self.tokens.mask(view)
        if visible:
            index = view["visible"]
            x = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            mask = view["visible_mask"]
        cls = self.cls_token + getattr(self.tokens, "cls_position", 0)
        x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        attn_mask = mask[:, None, None, :]
        for block in self.blocks:
            x = self.call_layer(block, x, attn_mask)
        return self.norm(x), mask


class TextEncoder(nn.Module):
    """The momentum copy of the text encoder: BERT's embeddings and its bottom layers."""

    def __init__(self, embeddings: nn.Module, layers: list[nn.Module]):
        super().__init__()
        self.embeddings = copy.deepcopy(embeddings)
        self.layer = nn.ModuleList(copy.deepcopy(layer) for layer in layers)


class ImageDecoder(nn.Module):
    """MAE's decoder with the text: [visible image states and a mask token (+ its position) at every
    hidden element, in the elements' order] + [text encoder states], each projected to the
    decoder's width with a modality embedding; pre-norm blocks; the elements' predictions."""

    def __init__(self, image_width: int, text_width: int, width: int, layers: int, heads: int, target_dim: int):
        super().__init__()
        self.image_in = nn.Linear(image_width, width)
        self.text_in = nn.Linear(text_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.location = nn.Linear(5, width)  # where a hidden region is: its box
        self.modality = nn.Embedding(2, width)
        self.blocks = nn.ModuleList(ViTBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=VIT_EPS)
        self.head = nn.Linear(width, target_dim)
        self.call_layer = call_layer

    def forward(self, image_states, view, text_states, text_mask, positions, element_mask):
        """image_states [B, 1 + K, W] (the encoder's, visible only); positions [B, N, 5] and
        element_mask [B, N] of every element -> predictions [B, N, target]."""
        b, slots = element_mask.shape
        visible = self.image_in(image_states[:, 1:])
        # the visible elements back at their places, a mask token at the others; the padding of
        # `visible` goes to a spare slot past the end, dropped
        index = torch.where(view["visible_mask"], view["visible"], slots).unsqueeze(-1).expand_as(visible)
        grid = self.mask_token.to(visible.dtype).expand(b, slots + 1, -1).scatter(1, index, visible)[:, :slots]
        grid = grid + self.location(positions)
        image = torch.cat([self.image_in(image_states[:, :1]), grid], 1) + self.modality.weight[1]
        text = self.text_in(text_states) + self.modality.weight[0]
        x = torch.cat([image, text], 1)
        mask = torch.cat([torch.ones_like(element_mask[:, :1]), element_mask, text_mask], 1)
        attn_mask = mask[:, None, None, :]
        for block in self.blocks:
            x = self.call_layer(block, x, attn_mask)
        return self.head(self.norm(x[:, 1:1 + slots]))


# -- the model ---------------------------------------------------------------------------------

def _vision_shape(cfg_model, text_config) -> tuple[int, int, int]:
    return (cfg_model.vision_layers or text_config.num_hidden_layers, cfg_model.vision_hidden or text_config.hidden_size,
            cfg_model.vision_heads or text_config.num_attention_heads)


class VLMAEModel(PretrainingHeads, pretrained.PretrainedModel, nn.Module):
    arch = ARCH
    tag_rows = ("mrc.1.weight", "mrc.1.bias")
    not_exported = ("momentum_",)  # the EMA copies: training's (in checkpoints), not fine-tuning's
    CONTRAST_DIM = 256  # ALBEF's projection size

    def __init__(self, bert_config, spec: dict):
        """`spec`: feature_dim, tags, fusion_layers, vision [layers, width, heads], decoder [layers,
        width, heads], visual (regions | patches) and for patches image_size, patch_size, pixel_mean,
        pixel_std (what vlp_config() saves)."""
        super().__init__()
        self.spec = dict(spec)
        h, eps = bert_config.hidden_size, bert_config.layer_norm_eps
        layers = bert_config.num_hidden_layers
        self.fusion_layers = spec["fusion_layers"] or layers // 2
        if not 0 < self.fusion_layers < layers:
            raise ValueError(f"model.fusion_layers={spec['fusion_layers']}: a {layers}-layer BERT splits into text "
                             f"and fusion layers, each at least one (0: half)")
        self.text_layers = layers - self.fusion_layers
        v_layers, v_width, v_heads = spec["vision"]
        d_layers, d_width, d_heads = spec["decoder"]
        for what, width, heads in (("vision", v_width, v_heads), ("decoder", d_width, d_heads)):
            if width % heads:
                raise ValueError(f"model.{what}_hidden={width} is not a multiple of model.{what}_heads={heads}")
        self.bert = BertBackbone(bert_config)
        for i in range(self.text_layers, layers):
            self.bert.encoder.layer[i] = FusionLayer(bert_config, v_width)
        self.visual = spec.get("visual", "regions")
        if self.visual == "regions":
            tokens, target_dim = RegionTokens(spec["feature_dim"], v_width), spec["feature_dim"]
        elif self.visual == "patches":
            tokens = PatchTokens(v_width, spec["image_size"], spec["patch_size"], spec["pixel_mean"], spec["pixel_std"])
            target_dim = 3 * spec["patch_size"] ** 2
        else:
            raise ValueError(f"model.visual={self.visual!r}: vlmae sees an image as regions or as patches (not both)")
        self.vision = ImageEncoder(tokens, v_width, v_layers, v_heads)
        self.decoder = ImageDecoder(v_width, h, d_width, d_layers, d_heads, target_dim)
        self.vision_proj = nn.Linear(v_width, self.CONTRAST_DIM)
        self.text_proj = nn.Linear(h, self.CONTRAST_DIM)
        self.itc_log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learnable temperature
        self.ifr = nn.Linear(v_width, v_width)  # IFR: the visible [I_CLS] projected to the full image's
        # ITM, MLM and the μ-VLA granularities' heads (MRC, MRFR); image states brought to the text width for the latter
        self.add_pretraining_heads(h, eps, bert_config.vocab_size, spec["tags"], spec["feature_dim"], itm_pooler=False)
        self.image_to_text = nn.Linear(v_width, h)
        self.feature_dim = spec["feature_dim"]
        self._init_new(bert_config.initializer_range)
        self.momentum_vision = copy.deepcopy(self.vision)
        self.momentum_text = TextEncoder(self.bert.embeddings, list(self.bert.encoder.layer[:self.text_layers]))
        self.momentum_vision_proj = copy.deepcopy(self.vision_proj)
        self.momentum_text_proj = copy.deepcopy(self.text_proj)
        for module in self._momentum_modules():
            module.requires_grad_(False)

    def _init_new(self, std: float):
        pretrained.init_like_bert(self, std)  # init folders' weights (BERT, a ViT) are loaded over it (build)
        for token in (self.vision.cls_token, self.decoder.mask_token):
            nn.init.trunc_normal_(token, std=std)

    # -- momentum ------------------------------------------------------------------------------

    def _momentum_modules(self):
        return (self.momentum_vision, self.momentum_text, self.momentum_vision_proj, self.momentum_text_proj)

    def _momentum_pairs(self):
        """(online parameters, momentum parameters), in the same order."""
        online = [*self.vision.parameters(), *self.bert.embeddings.parameters(),
                  *(p for layer in self.bert.encoder.layer[:self.text_layers] for p in layer.parameters()),
                  *self.vision_proj.parameters(), *self.text_proj.parameters()]
        momentum = [p for module in self._momentum_modules() for p in module.parameters()]
        return online, momentum

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """The momentum encoders start as copies of the online ones (after an init is loaded)."""
        online, momentum = self._momentum_pairs()
        torch._foreach_copy_(momentum, online)

    def rebuild_not_exported(self) -> None:
        """A model loaded from an export (which has no momentum encoders) starts them as copies."""
        self.copy_to_momentum()

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """EMA: m <- momentum x m + (1 - momentum) x online (online weights are read, never changed)."""
        online, moving = self._momentum_pairs()
        torch._foreach_mul_(moving, momentum)
        torch._foreach_add_(moving, [p.detach() for p in online], alpha=1.0 - momentum)

    # -- what from_pretrained needs --------------------------------------------------------------

    def vlp_config(self) -> dict:
        keys = ("feature_dim", "tags", "fusion_layers", "vision", "decoder", "visual")
        if self.visual == "patches":
            keys += ("image_size", "patch_size", "pixel_mean", "pixel_std")
        return {k: self.spec[k] for k in keys if k in self.spec}

    @classmethod
    def from_vlp_config(cls, bert_config, section: dict) -> "VLMAEModel":
        return cls(bert_config, section)

    def set_layer_call(self, call) -> None:
        """The text encoders', image encoders', decoder's and fusion layers go through `call` (compiled):
        a graph per layer kind (the ViT, its momentum copy, BERT's, its momentum copy, the decoder's,
        the fusion layer: 6; the momentum copies' frozen parameters and no-grad calls make them
        kinds of their own) for training, and at most as many for the no-grad eval-mode forward of
        evaluation and the ITM weights (tests/vlp_train/test_compile.py)."""
        if call is not call_layer:
            from vlp_train.compile import allow_graphs
            allow_graphs(12)
        self.bert.call_layer = self.vision.call_layer = self.momentum_vision.call_layer = call
        self.decoder.call_layer = call

    # -- the encoders ----------------------------------------------------------------------------

    def encode_text(self, input_ids, text_mask, momentum: bool = False):
        """The text encoder (the bottom BERT layers) -> states [B, T, H]."""
        embeddings, layers = (self.momentum_text.embeddings, self.momentum_text.layer) if momentum else \
            (self.bert.embeddings, self.bert.encoder.layer[:self.text_layers])
        x, attn_mask = embeddings(input_ids), text_mask[:, None, None, :]
        for layer in layers:
            x = self.bert.call_layer(layer, x, attn_mask)
        return x

    def fuse(self, text_states, text_mask, image_states, image_mask):
        """The fusion learner: the top BERT layers, cross-attending to the image -> [B, T, H]."""
        attn_mask, cross_mask = text_mask[:, None, None, :], image_mask[:, None, None, :]
        for layer in self.bert.encoder.layer[self.text_layers:]:
            text_states = self.bert.call_layer(layer, text_states, attn_mask, image_states, cross_mask)
        return text_states

    def encode_image(self, view, visible: bool = False, momentum: bool = False, features=None):
        return (self.momentum_vision if momentum else self.vision)(view, visible, features)

    # the dual encoder (families.Family.dual_encoder): the online encoders over the whole image
    def embed_images(self, features, locations, region_mask, pixels=None):
        """The image encoder over every element -> its projected, L2-normalised [I_CLS] [B, 256], float32."""
        view = {"features": features, "locations": locations, "region_mask": region_mask, "pixels": pixels}
        return contrast_feature(self.vision_proj, self.encode_image(view)[0])

    def embed_texts(self, input_ids, text_mask):
        """The text encoder -> its projected, L2-normalised [CLS] [B, 256], float32."""
        return contrast_feature(self.text_proj, self.encode_text(input_ids, text_mask))

    @property
    def contrast_log_scale(self) -> nn.Parameter:
        return self.itc_log_scale

    def forward(self, input_ids, text_mask, features, locations, region_mask, pixels=None):
        """The μ-VLA granularities' interface: (fused text states [B, T, H], region states [B, R, H])
        over the whole image (no MAE masking; zeroed regions are the view's)."""
        text, regions, _ = self.encode(input_ids, text_mask, features, locations, region_mask, pixels)
        return text, regions

    def encode(self, input_ids, text_mask, features, locations, region_mask, pixels=None, masked_regions=None):
        """(fused text states, region states or None on patches, image states [B, 1 + N, W])."""
        if self.visual == "patches" and masked_regions is not None:
            raise ValueError("vlmae on patches trains the image-text task and image-sentence; the region-tag and "
                             "region-phrase granularities (regions masked on patches) need model.visual=regions")
        view = {"features": features, "locations": locations, "region_mask": region_mask, "pixels": pixels}
        image, image_mask = self.encode_image(view)
        text = self.fuse(self.encode_text(input_ids, text_mask), text_mask, image, image_mask)
        regions = self.image_to_text(image[:, 1:]) if self.visual == "regions" else None
        return text, regions, image

    # -- heads ----------------------------------------------------------------------------------

    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings


def build(cfg_model, feature_dim: int, tags: list[str]) -> VLMAEModel:
    """A model initialised as model.init says: a saved vlmae model (the whole of it), or a BERT (the
    text encoder and fusion learner; cross-attention, the image side and the heads start random)."""
    kind, folder = pretrained.resolve_init(cfg_model.init)
    if kind == "vlp":
        return pretrained.init_from(folder, VLMAEModel, cfg_model, feature_dim, tags)
    config = bert_config(cfg_model, folder)
    visual, vision_init = getattr(cfg_model, "visual", "regions"), getattr(cfg_model, "vision_init", None)
    spec = {"feature_dim": feature_dim, "tags": list(tags), "fusion_layers": cfg_model.fusion_layers,
            "vision": list(_vision_shape(cfg_model, config)),
            "decoder": [cfg_model.decoder_layers, cfg_model.decoder_hidden, cfg_model.decoder_heads], "visual": visual}
    vit = None
    if vision_init:
        from vlp_train.visual import read_vit
        vit = read_vit(vision_init)
    if visual == "patches":
        from vlp_train.visual import pixel_stats
        mean, std = pixel_stats(vit)
        spec.update(image_size=cfg_model.image_size, patch_size=cfg_model.patch_size, pixel_mean=list(mean),
                    pixel_std=list(std))
    model = VLMAEModel(config, spec)
    if folder is not None:
        load_bert_init(model.bert, model.mlm_transform, model.mlm_bias, folder, new=("crossattention",))
    if vit is not None:
        load_vit(model, vit[0], vision_init)
    model.copy_to_momentum()
    return model


def load_vit(model: VLMAEModel, weights: dict, where: str) -> None:
    """The image encoder from a ViT's weights (timm's names, `visual.read_vit`): its blocks, final
    norm and [CLS]; on patches its patch projection and position embeddings too (resized to this
    grid). A ViT of another width or depth is an error naming the folder."""
    encoder = model.vision
    state = {k: v for k, v in weights.items() if k.startswith(("blocks.", "norm.")) or k == "cls_token"}
    if model.visual == "patches":
        from vlp_train.visual import resize_pos_embed
        tokens = encoder.tokens
        for name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            state[f"tokens.{name}"] = weights[name]
        pos = weights["pos_embed"]
        state["tokens.pos_embed"] = resize_pos_embed(pos, tokens.grid, f"model.vision_init {where}")
    ours = encoder.state_dict()
    wrong = [k for k, v in state.items() if k not in ours or ours[k].shape != v.shape]
    missing = [k for k in ours if k.startswith(("blocks.", "norm.")) and k not in state]
    if wrong or missing:
        raise ValueError(f"model.vision_init {where}: a ViT that does not fit the image encoder "
                         f"({len(encoder.blocks)} x {encoder.norm.normalized_shape[0]}): "
                         f"{(wrong + missing)[:4]} (set model.vision_layers/hidden/heads to the ViT's)")
    encoder.load_state_dict(state, strict=False)
    log.info("initialised the image encoder from the ViT in %s", where)


# -- the pair view (built in the loader) -----------------------------------------------------------

def visible_elements(counts: list[int], mask_ratio: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """MAE's per-sample masking: of each sample's `count` elements keep int(count x (1 - ratio))
    (at least one), drawn at random, in their order -> (visible [B, K] indices, visible_mask [B, K]),
    K the most kept in the batch (exactly (1 - ratio) N when every image has N elements)."""
    kept = [sorted(rng.sample(range(n), max(1, int(n * (1 - mask_ratio))))) if n else [] for n in counts]
    width = max(1, max(map(len, kept)))
    visible = np.zeros((len(counts), width), np.int64)
    visible_mask = np.zeros((len(counts), width), bool)
    for i, row in enumerate(kept):
        visible[i, :len(row)] = row
        visible_mask[i, :len(row)] = True
    return visible, visible_mask


def relevant_weights(centres: np.ndarray, real: np.ndarray, boxes: list, similarities: list[float],
                     link_weight: bool) -> np.ndarray:
    """RMIM's text-relevant region: an element (a region or a patch) is in it when its centre
    lies inside the union of the boxes linked to the sentence's phrases; its weight is 1, or with
    `link_weight` the highest similarity of the links whose box holds it. No linked box: the whole
    image (weight 1 everywhere). centres [N, 2] (x, y) in the boxes' coordinates."""
    if not boxes:
        return real.astype(np.float32)
    weights = np.zeros(len(centres), np.float32)
    for (x1, y1, x2, y2), similarity in zip(boxes, similarities):
        inside = (centres[:, 0] >= x1) & (centres[:, 0] <= x2) & (centres[:, 1] >= y1) & (centres[:, 1] <= y2)
        weights = np.maximum(weights, np.where(inside, similarity if link_weight else 1.0, 0.0))
    return weights * real


def pair_view(builder, samples, sentences, rng, mask_ratio: float = 0.5, grid: int = 0) -> dict:
    """VLMAE's view of (image, retrieved sentence): the clean sentence (ITC, ITM, the decoder's
    text) and a 15%-masked copy (MLM, 80/10/10); the image's visible elements (MAE masking, ratio
    `mask_ratio`) and RMIM's weight of each hidden element (inside the linked boxes); text keys.
    The elements are the regions, or with `grid` the grid x grid patches (the loader adds `pixels`)."""
    feats, locs, regions, _ = builder._regions(samples)
    elements = np.ones((len(samples), grid * grid), bool) if grid else regions
    ids, clean_ids, tmask, positions, targets = builder._mlm([s["text"] for s in sentences], rng)
    visible, visible_mask = visible_elements([int(r.sum()) for r in elements], mask_ratio, rng)
    hidden = elements.copy()
    for i in range(len(samples)):
        hidden[i, visible[i][visible_mask[i]]] = False
    rmim = np.zeros(elements.shape, np.float32)
    cells = patch_cells(grid) if grid else None
    for i, (sample, sentence) in enumerate(zip(samples, sentences)):
        meta, n = sample["meta"], int(regions[i].sum())
        if grid:  # patch centres in the boxes' coordinates (the image is resized to the square whole)
            centres = (cells[:, :2] + cells[:, 2:4]) / 2 * np.array([meta["width"], meta["height"]], np.float32)
        else:
            boxes = np.asarray(meta["boxes"][:n], np.float32).reshape(-1, 4)
            centres = np.zeros((elements.shape[1], 2), np.float32)
            centres[:n] = (boxes[:, :2] + boxes[:, 2:]) / 2
        links = [p for p in sentence["phrases"] if p.get("region") is not None and p["region"] < n]
        rmim[i] = relevant_weights(centres, elements[i], [meta["boxes"][p["region"]] for p in links],
                                   [p["similarity"] for p in links], builder.obj.rmim_link_weight) * hidden[i]
    obj = builder.obj
    return {"task": PAIR_TASK, **builder._tensors(
        input_ids=ids, text_mask=tmask, mlm_positions=positions, mlm_targets=targets, clean_ids=clean_ids,
        features=feats, locations=locs, region_mask=regions, visible=visible, visible_mask=visible_mask,
        hidden=hidden, rmim_weight=rmim, text_keys=np.array([text_key(s["text"]) for s in sentences], np.int64),
        retrieved_keys=retrieved_text_keys(samples), active=np.ones(len(samples), bool)),
        "momentum": float(obj.momentum), "distill_alpha": float(obj.distill_alpha), "rmim_norm": bool(obj.rmim_norm)}


def views(cfg) -> dict:
    import functools
    patches = getattr(cfg.model, "visual", "regions") == "patches"
    return {PAIR_TASK: functools.partial(pair_view, mask_ratio=cfg.model.mask_ratio,
                                         grid=cfg.model.image_size // cfg.model.patch_size if patches else 0)}


# -- the pair objectives ----------------------------------------------------------------------------

def rmim_losses(predictions, targets, weights, norm: bool):
    """Per sample: the weighted mean over its elements of the MSE (over an element's dims) between
    prediction and (normalised) target; weights [B, N] are 0 outside the hidden, text-relevant ones."""
    targets = targets.float()
    if norm:  # MAE's norm_pix_loss: each element standardised by its own mean and variance
        targets = standardise(targets)
    squared = (predictions.float() - targets).pow(2).mean(-1)
    return (squared * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


def pair_losses(model: VLMAEModel, view: dict):
    """RMIM + IFR + ITC (momentum-distilled) + ITM (hard negatives) + MLM, each per sample."""
    from vlp_train.objectives import masked_token_losses
    from vlp_train.objectives.contrastive import gather_padded, itc_losses, itm_with_hard_negatives, logit_scale_of

    if model.training and torch.is_grad_enabled():
        model.momentum_update(view["momentum"])
    image, image_mask = model.encode_image(view, visible=True)
    text = model.encode_text(view["clean_ids"], view["text_mask"])
    with torch.no_grad():
        full_image, _ = model.encode_image(view, momentum=True)
        momentum_text = model.encode_text(view["clean_ids"], view["text_mask"], momentum=True)
        m_image = contrast_feature(model.momentum_vision_proj, full_image)
        m_text = contrast_feature(model.momentum_text_proj, momentum_text)
    image_feat = contrast_feature(model.vision_proj, image)
    text_feat = contrast_feature(model.text_proj, text)

    # ITC, targets distilled from the momentum encoders' similarities (ALBEF), over the global batch
    alpha = view["distill_alpha"]
    soft = None
    if alpha:
        with torch.no_grad():
            scale = logit_scale_of(model.itc_log_scale)
            all_m_text, all_m_image = gather_padded(m_text)[0], gather_padded(m_image)[0]
            soft = (F.softmax(scale * m_image @ all_m_text.T, 1), F.softmax(scale * m_text @ all_m_image.T, 1))
    contrast = itc_losses(image_feat, text_feat, model.itc_log_scale, view["text_keys"], soft, alpha,
                          image_keys=view.get("retrieved_keys"))  # an image's K retrieved sentences: never its negatives

    # ITM: the pair, and hard negatives from the ITC similarities (a negative text for each image,
    # a negative image for each text), on the visible image states, as the paper's ITM uses I^vis.
    # The states of every rank are gathered (the other ranks' as constants, the local rows keep
    # their graph), padded to the longest text and the most visible elements.
    all_image, _, _ = gather_padded(image)
    all_image_mask = gather_padded(image_mask, pad_value=False)[0]
    all_text, _, _ = gather_padded(text)
    all_text_mask = gather_padded(view["text_mask"], pad_value=False)[0]

    def pair_logits(text_rows, image_rows):
        return model.itm_logits(model.fuse(all_text[text_rows], all_text_mask[text_rows], all_image[image_rows],
                                           all_image_mask[image_rows]))
    itm_loss, itm_logits = itm_with_hard_negatives(contrast, view["text_keys"], pair_logits)

    # MLM on the fusion learner over the masked sentence and the visible image
    masked = model.fuse(model.encode_text(view["input_ids"], view["text_mask"]), view["text_mask"], image, image_mask)
    mlm = masked_token_losses(model, masked, view["mlm_positions"], view["mlm_targets"])

    losses = {**reconstruction_losses(model, view, image, text, full_image), "itc": contrast.losses,
              "itm": itm_loss, "mlm": mlm}
    return losses, {"itm_logits": itm_logits[:text.shape[0]]}


def reconstruction_losses(model: VLMAEModel, view: dict, image, text, full_image) -> dict:
    """RMIM: the decoder over the visible states, mask tokens and the clean text states; IFR: the
    visible [I_CLS], projected, to the momentum encoder's [I_CLS] of the whole image."""
    tokens = model.vision.tokens
    predictions = model.decoder(image, view, text, view["text_mask"], tokens.positions(view), tokens.mask(view))
    rmim = rmim_losses(predictions, tokens.targets(view), view["rmim_weight"], view["rmim_norm"])
    ifr = (model.ifr(image[:, 0]).float() - full_image[:, 0].float()).abs().mean(-1)
    return {"rmim": rmim, "ifr": ifr}


@torch.no_grad()
def evaluate(model, builder, urls, tasks, cfg, device, autocast) -> dict:
    """Held-out pairs: in-batch image->text and text->image recall@1 of the contrast features
    (full image), ITM accuracy and ROC-AUC of each true pair against its image with the next
    sample's sentence, masked-token accuracy of the sentences, RMIM and IFR losses."""
    from vlp_train.evaluate import held_out_stream

    stream = held_out_stream(urls, builder, [PAIR_TASK], cfg)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # never shift training's RNG
        return _evaluate(model, stream, cfg, device, autocast)


def _evaluate(model, stream, cfg, device, autocast) -> dict:
    from vlp_train.evaluate import count_masked_tokens, itm_metrics, recall_at
    from vlp_train.step import to_device

    was_training = model.training
    model.eval()
    hits, losses, scores, labels = [0, 0], {"rmim": [], "ifr": []}, [], []
    recalled, queries = {"i2t": 0.0, "t2i": 0.0}, 0  # in-batch recall@1, summed over the batches' queries
    for n, batch in enumerate(stream):
        if n >= cfg.run.eval_batches:
            break
        view = to_device(batch["views"], device)[PAIR_TASK]
        with autocast:
            # no collective here: evaluation runs on rank 0 alone (pair_losses gathers over ranks)
            text = model.encode_text(view["clean_ids"], view["text_mask"])
            visible, _ = model.encode_image(view, visible=True)
            named = reconstruction_losses(model, view, visible, text, model.encode_image(view, momentum=True)[0])
            for name in losses:
                losses[name] += named[name].float().tolist()
            full, full_mask = model.encode_image(view)
            image_feat = contrast_feature(model.vision_proj, full)
            text_feat = contrast_feature(model.text_proj, text)
            with torch.autocast(device.type, enabled=False):  # fp32: bf16 ties would count against recall
                similarity = image_feat @ text_feat.T
            same = view["text_keys"][:, None] == view["text_keys"][None, :]  # a text of the same key is right
            for direction, (by, right) in (("i2t", (similarity, same)), ("t2i", (similarity.T, same.T))):
                recalled[direction] += recall_at(by, right, ks=(1,))[1] * len(same)
            queries += len(same)
            other = torch.roll(torch.arange(len(same), device=device), -1)
            for texts, keep in ((torch.arange(len(same), device=device), None), (other, ~same[torch.arange(len(same)), other])):
                fused = model.fuse(text[texts], view["text_mask"][texts], full, full_mask)
                probability = F.softmax(model.itm_logits(fused).float(), -1)[:, 1]
                positive = keep is None
                kept = probability if positive else probability[keep]
                scores += kept.tolist()
                labels += [int(positive)] * len(kept)
            masked = model.fuse(model.encode_text(view["input_ids"], view["text_mask"]), view["text_mask"], full,
                                full_mask)
            count_masked_tokens(model, masked, view, hits)
    model.train(was_training)
    result = {"sentence_mlm_acc": hits[0] / hits[1] if hits[1] else float("nan"),
              **{f"itc_{direction}_r1": total / queries if queries else float("nan")
                 for direction, total in recalled.items()},
              **{name: float(np.mean(values)) if values else float("nan") for name, values in losses.items()},
              **itm_metrics(scores, labels)}
    result["pairs"] = int(sum(labels))
    return result


FAMILY = register(Family(
    name=ARCH, model_class=VLMAEModel, build=build, evaluate=evaluate, match_probability=clean_pair_match_probability,
    views=views, visual_inputs=("regions", "patches"), dual_encoder=True,
    # region-tag and region-phrase mask regions: on patches alone there are none to mask
    patch_tasks=(PAIR_TASK, Task.IMAGE_SENTENCE),
    objectives={PAIR_TASK: pair_losses, Task.REGION_TAG: region_tag_losses, Task.REGION_PHRASE: region_phrase_losses,
                Task.IMAGE_SENTENCE: image_sentence_losses}))
