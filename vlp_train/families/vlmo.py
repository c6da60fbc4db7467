"""VLMo (`model.arch=vlmo`): a multiway transformer, "Unified Vision-Language Pre-Training with
Mixture-of-Modality-Experts" (Bao et al.), on our weakly aligned corpus.

Every layer has one self-attention shared by all modalities and a modality-switched FFN: the
vision expert (V-FFN), the language expert (L-FFN) and, in the top `model.vl_layers` layers (the
paper's F), the vision-language expert (VL-FFN). Routing (`MultiwayLayer.experts_of`):
- image alone: V-FFN in every layer; text alone: L-FFN in every layer;
- an image-text pair ([text] + [I_CLS] + the image's tokens): below the top F layers text positions take
  the L-FFN and image positions the V-FFN; in the top F layers every position takes the VL-FFN.

Visual input (`model.visual`): region features (regions: V-FFN over regions, [I_CLS] a learned
vector in front of them), 16x16 patches of the image (patches, the paper's setting: the patch
embedding's [CLS] is [I_CLS]; `model.vision_init` a ViT for the patch embedding and the V-FFN), or
both. [T_CLS] is BERT's [CLS]. Contrast: [CLS] states -> linear projection -> L2 normalisation,
with a learnable temperature.

Layers are BERT's (post-LayerNorm, each expert its own LayerNorm as in VLMo), initialised from
the init BERT (the bundled MiniLM by default): the shared attention from BERT's attention and
every expert from BERT's FFN of that layer. The model also has the single-stream model's heads
and interface (`forward` = the fusion encoder over a pair), so μ-VLA's granularities (region-tag,
region-phrase, image-sentence) run on the fusion encoder beside VLMo's objectives, by config.

Objectives (vlp_train/objectives/contrastive.py holds ITC and hard-negative sampling):
- `vl` (image-text): ITC over the global batch (V/L experts, unimodal passes), ITM on the fusion
  [T_CLS] with a hard negative image and text per sample drawn from the ITC similarities over the
  global batch, MLM on the fusion encoder;
- `img` (the vision stage): masked region-feature regression through the V-FFN alone (on patches:
  the patches under masked regions hidden; without region features, their pixels regressed);
- `txt` (the language stage): MLM through the L-FFN alone.

Stages (`model.stage`): vision trains the attention, V-FFN, region / patch embedding, [I_CLS]
and the regression head; language trains the text embeddings, L-FFN and MLM head (attention
frozen); vl trains everything. `set_stage` sets which parameters train.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from vlp_train import pretrained
from vlp_train.backbone import BertAttention, BertEmbeddings, FeedForward, PretrainingHeads, bert_config, bert_parts, \
    call_layer, load_mlm_head, read_weights
from vlp_train.config import VISUAL_INPUTS
from vlp_train.families import Family, clean_pair_match_probability, register
from vlp_train.objectives.contrastive import contrast_feature
from vlp_train.objectives.image_sentence import image_sentence_losses
from vlp_train.objectives.region_phrase import region_phrase_losses
from vlp_train.objectives.region_tag import region_tag_losses
from vlp_train.objectives.vlmo import image_only_losses, image_text_losses, text_only_losses
from vlp_train.tasks import Task
from vlp_train.visual import (IMAGENET_MEAN, IMAGENET_STD, PatchEmbedding, PatchRegions, RegionEmbedding, patch_settings,
                              pixel_stats, read_vision_init)

log = logging.getLogger(__name__)

ARCH = "vlmo"
IMAGE, TEXT, PAIR = "image", "text", "pair"   # the three modes of a pass
V, L, VL = "v_ffn", "l_ffn", "vl_ffn"          # the experts (also their parameter names)


class MultiwayLayer(nn.Module):
    """Shared self-attention + modality-switched FFN (each expert BERT's FFN, `backbone.FeedForward`)."""

    def __init__(self, cfg, vl_expert: bool):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.v_ffn, self.l_ffn = FeedForward(cfg), FeedForward(cfg)
        self.vl_ffn = FeedForward(cfg) if vl_expert else None

    def experts_of(self, mode: str, text_len: int, length: int) -> list[tuple[str, int, int]]:
        """(expert, first position, end) of each span of the sequence in `mode`; a pair's sequence
        is [text (text_len positions)] + [image]."""
        if mode == IMAGE:
            return [(V, 0, length)]
        if mode == TEXT:
            return [(L, 0, length)]
        if self.vl_ffn is not None:
            return [(VL, 0, length)]
        return [(L, 0, text_len), (V, text_len, length)]

    def forward(self, x, attn_mask, mode: str, text_len: int = 0, call=call_layer):
        """`call`: how the attention and each expert are called (compile.CompiledLayers: compiled, the
        attention and the FFN each one region whatever the layer, mode or expert)."""
        x = call(self.attention, x, attn_mask)
        spans = self.experts_of(mode, text_len, x.shape[1])
        if len(spans) == 1:
            return call(getattr(self, spans[0][0]), x)
        # each span copied out contiguous: a compiled expert then sees one memory layout (a strided
        # view of the sequence would compile a second graph of the FFN)
        return torch.cat([call(getattr(self, name), x[:, start:end].contiguous()) for name, start, end in spans], 1)


class VLMoModel(PatchRegions, PretrainingHeads, pretrained.PretrainedModel, nn.Module):
    """Multiway transformer over regions and text, with the contrastive, ITM, MLM and region heads."""

    arch = ARCH
    tag_rows = ("mrc.1.weight", "mrc.1.bias")

    def __init__(self, bert_config, feature_dim: int, tags: list[str], vl_layers: int, stage: str = "vl",
                 visual: str = "regions", image_size: int = 384, patch_size: int = 16, pixel_mean=IMAGENET_MEAN,
                 pixel_std=IMAGENET_STD):
        super().__init__()
        layers = bert_config.num_hidden_layers
        if not 0 <= vl_layers <= layers:
            raise ValueError(f"model.vl_layers={vl_layers}: VLMo's VL-FFN layers must be 0..{layers} (model layers)")
        if visual not in VISUAL_INPUTS:
            raise ValueError(f"model.visual={visual!r}: expected one of {VISUAL_INPUTS}")
        self.config = bert_config
        h, eps = bert_config.hidden_size, bert_config.layer_norm_eps
        self.embeddings = BertEmbeddings(bert_config)
        self.layers = nn.ModuleList(MultiwayLayer(bert_config, vl_expert=i >= layers - vl_layers) for i in range(layers))
        self.call_layer = call_layer  # how a layer calls its attention and experts (compile.CompiledLayers)
        token_type = self.embeddings.token_type_embeddings
        self.visual = visual
        self.region = RegionEmbedding(feature_dim, bert_config, token_type) if visual != "patches" else None
        self.patches = PatchEmbedding(h, image_size, patch_size, token_type, eps, bert_config.hidden_dropout_prob,
                                      pixel_mean, pixel_std) if visual != "regions" else None
        # [I_CLS]: a learned vector in front of the regions; on patches the patch embedding's
        # visual [CLS] (a ViT's, with model.vision_init)
        self.image_cls = nn.Parameter(torch.zeros(h)) if self.patches is None else None
        # contrast: [CLS] -> linear -> L2 (vlp_train/objectives/contrastive.py)
        self.image_proj = nn.Linear(h, h, bias=False)
        self.text_proj = nn.Linear(h, h, bias=False)
        from vlp_train.objectives.contrastive import LOGIT_SCALE_INIT
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        # ITM through the pooler (Linear + tanh) on [T_CLS]
        self.add_pretraining_heads(h, eps, bert_config.vocab_size, tags, feature_dim or 3 * patch_size ** 2)
        self.feature_dim, self.vl_layers = feature_dim, vl_layers
        self._init_new(bert_config.initializer_range)
        self.set_stage(stage)

    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def _init_new(self, std: float):
        pretrained.init_like_bert(self, std)  # an init folder's weights are loaded over it (build)
        if self.image_cls is not None:
            nn.init.normal_(self.image_cls, std=std)

    # -- stages --------------------------------------------------------------------------------

    def stage_parameters(self, stage: str) -> list[str]:
        """The names of the parameters `stage` trains."""
        names = [n for n, _ in self.named_parameters()]
        if stage == "vl":
            return names
        if stage == "vision":  # attention + V-FFN on images alone
            keep = (".attention.", f".{V}.", "region.", "patches.", "image_cls", "mrfr.")
        elif stage == "language":  # L-FFN (and the text embeddings and MLM head); attention frozen
            keep = (f".{L}.", "embeddings.word_embeddings", "embeddings.position_embeddings",
                    "embeddings.LayerNorm", "mlm_transform.", "mlm_bias")
        else:
            raise ValueError(f"model.stage={stage!r}: expected vision, language or vl")
        # the token-type table (row 0 text's, row 1 the regions') is shared by both modalities:
        # it trains in the vl stage only
        return [n for n in names if any(k in n or n.startswith(k) for k in keep)]

    def set_stage(self, stage: str) -> None:
        trained = set(self.stage_parameters(stage))
        for name, p in self.named_parameters():
            p.requires_grad_(name in trained)
        self.stage = stage

    # -- what from_pretrained needs to rebuild it ------------------------------------------------

    def bert_config(self):
        return self.config

    def vlp_config(self) -> dict:
        config = {"feature_dim": self.feature_dim, "tags": self.tags, "vl_layers": self.vl_layers, "visual": self.visual}
        if self.patches is not None:
            config.update(self.patches.settings())
        return config

    @classmethod
    def from_vlp_config(cls, bert_config, section: dict) -> "VLMoModel":
        return cls(bert_config, section["feature_dim"], section["tags"], section["vl_layers"], "vl",
                   section.get("visual", "regions"), *patch_settings(section))

    def set_layer_call(self, call) -> None:
        """How each layer calls its shared attention and its experts (compile.CompiledLayers swaps in
        a compiled call: the attention and the FFN are the compiled regions, so the expert a mode
        picks is a module argument, not a graph of its own)."""
        self.call_layer = call

    # -- encoders ----------------------------------------------------------------------------
    # The image is [I_CLS] + regions (model.visual=regions), the patch embedding's [CLS] + patches
    # (patches), or [CLS] + regions + patches (both). A region's state is its token's, the mean of
    # its patches' states, or the mean of the two (as the single-stream model's).

    def image_embedding(self, features, locations, region_mask, pixels=None, masked_regions=None):
        """The image's input sequence [B, 1 + ..., D], [I_CLS] first, and its padding mask.
        `masked_regions` [B, R]: regions whose patches are hidden (the patch embedding's mask token)."""
        parts, masks = [], []
        if self.patches is not None:
            patches = self.embed_patches(pixels, locations, region_mask, masked_regions)  # [CLS] + patches
            cls, patches = patches[:, :1], patches[:, 1:]
        if self.region is not None:
            regions = self.region(features, locations)
            if self.patches is None:
                cls = self.image_cls.to(regions.dtype).expand(regions.shape[0], 1, -1)
            parts.append(regions)
            masks.append(region_mask)
        if self.patches is not None:
            parts.append(patches)
            masks.append(region_mask.new_ones(patches.shape[:2]))
        mask = torch.cat([region_mask.new_ones(region_mask.shape[0], 1)] + masks, 1)
        return torch.cat([cls] + parts, 1), mask

    def image_parts(self, image_states, locations, region_mask):
        """An image's states ([I_CLS] first) -> (region states [B, R, D], patch states [B, 1 + N, D]
        with [I_CLS] first, or None without patches)."""
        regions = region_mask.shape[1] if self.region is not None else 0
        if self.patches is None:
            return image_states[:, 1:1 + regions], None
        patches = torch.cat([image_states[:, :1], image_states[:, 1 + regions:]], 1)
        return self.region_states(patches[:, 1:], locations, region_mask,
                                  image_states[:, 1:1 + regions] if self.region is not None else None), patches

    def run_layers(self, hidden, padding_mask, mode: str, text_len: int = 0):
        attn_mask = padding_mask[:, None, None, :]
        for layer in self.layers:
            hidden = layer(hidden, attn_mask, mode, text_len, self.call_layer)
        return hidden

    def encode_image(self, features, locations, region_mask, pixels=None, masked_regions=None):
        """Image alone (V-FFN in every layer) -> [B, 1 + ..., D], [I_CLS] first."""
        hidden, mask = self.image_embedding(features, locations, region_mask, pixels, masked_regions)
        return self.run_layers(hidden, mask, IMAGE)

    def encode_text(self, input_ids, text_mask):
        """Text alone (L-FFN in every layer) -> [B, T, D], [T_CLS] first."""
        return self.run_layers(self.embeddings(input_ids), text_mask, TEXT)

    def encode(self, input_ids, text_mask, features, locations, region_mask, pixels=None, masked_regions=None):
        """The fusion encoder over pairs -> (text states [B, T, D], region states [B, R, D], patch
        states [B, 1 + N, D] or None): the single-stream model's `encode`, so μ-VLA's objectives
        run on it unchanged."""
        text = self.embeddings(input_ids)
        image, image_mask = self.image_embedding(features, locations, region_mask, pixels, masked_regions)
        t = input_ids.shape[1]
        hidden = self.run_layers(torch.cat([text, image], 1), torch.cat([text_mask, image_mask], 1), PAIR, t)
        regions, patches = self.image_parts(hidden[:, t:], locations, region_mask)
        return hidden[:, :t], regions, patches

    def forward(self, input_ids, text_mask, features, locations, region_mask, pixels=None, masked_regions=None):
        """The fusion encoder -> (text states, region states); see `encode`."""
        text, regions, _ = self.encode(input_ids, text_mask, features, locations, region_mask, pixels, masked_regions)
        return text, regions

    def image_features(self, image_states):
        return contrast_feature(self.image_proj, image_states)

    def text_features(self, text_states):
        return contrast_feature(self.text_proj, text_states)

    # the dual encoder (families.Family.dual_encoder)
    def embed_images(self, features, locations, region_mask, pixels=None):
        """The image alone (V-FFN) -> its projected, L2-normalised [I_CLS] [B, H], float32."""
        return self.image_features(self.encode_image(features, locations, region_mask, pixels))

    def embed_texts(self, input_ids, text_mask):
        """The text alone (L-FFN) -> its projected, L2-normalised [T_CLS] [B, H], float32."""
        return self.text_features(self.encode_text(input_ids, text_mask))

    @property
    def contrast_log_scale(self) -> nn.Parameter:
        return self.logit_scale


def load_bert_weights(model: VLMoModel, folder: str) -> None:
    """A HF BERT folder into the multiway model: embeddings; each layer's attention into the shared
    attention and its FFN into every expert of that layer (V, L and VL); BERT's MLM head when the
    folder has one. The BERT must have the model's layers (the VL-FFN layers are its top ones)."""
    weights, head = bert_parts(read_weights(folder))
    state = {}
    for name, tensor in weights.items():
        if name.startswith("embeddings.") and "position_ids" not in name:
            state[name] = tensor
        elif name.startswith("encoder.layer."):
            index, rest = name[len("encoder.layer."):].split(".", 1)
            if rest.startswith("attention."):
                state[f"layers.{index}.{rest}"] = tensor
            else:  # intermediate.* / output.*: the FFN, into every expert of the layer
                for expert in (V, L, VL):
                    state[f"layers.{index}.{expert}.{rest}"] = tensor
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k.startswith(("embeddings.", "layers.")) and k not in state]
    if missing:
        raise RuntimeError(f"model.init {folder} lacks weights the multiway model needs: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    with_head = load_mlm_head(head, model.mlm_transform, model.mlm_bias)
    log.info("initialised VLMo's attention and experts from %s%s", folder, " (and BERT's MLM head)" if with_head else "")


def build(cfg_model, feature_dim: int, tags: list[str]) -> VLMoModel:
    """A model initialised as model.init says (and model.vision_init on patches), training what
    model.stage trains."""
    kind, folder = pretrained.resolve_init(cfg_model.init)
    vit = read_vision_init(cfg_model)
    if kind == "vlp":
        model = pretrained.init_from(folder, VLMoModel, cfg_model, feature_dim, tags)
        saved = (model.vl_layers, model.visual, *((model.patches.image_size, model.patches.patch_size)
                                                   if model.patches else ()))
        asked = (cfg_model.vl_layers, cfg_model.visual, *((cfg_model.image_size, cfg_model.patch_size)
                                                          if cfg_model.visual != "regions" else ()))
        if saved != asked:
            raise ValueError(f"model.init {folder} is a VLMo of (vl_layers, visual, image_size, patch_size) {saved}, "
                             f"but the run's model.* ask for {asked}: set them as the saved model has them")
        if vit is not None:
            log.warning("model.vision_init %s is not used: model.init %s holds the whole model", cfg_model.vision_init,
                        folder)
    else:
        mean, std = pixel_stats(vit)
        model = VLMoModel(bert_config(cfg_model, folder), feature_dim, tags, cfg_model.vl_layers, "vl",
                          cfg_model.visual, cfg_model.image_size, cfg_model.patch_size, mean, std)
        if folder is not None:
            load_bert_weights(model, folder)
        if vit is not None:
            load_vit_weights(model, vit[0], vit[1], cfg_model.vision_init)
    model.set_stage(cfg_model.stage)
    return model


def load_vit_weights(model: VLMoModel, weights: dict, info: dict, where: str) -> None:
    """A ViT (visual.read_vit's timm names) into the vision side: the patch embedding ([CLS], position
    embeddings resized to the model's grid) and, when the ViT has the model's depth, each block's MLP
    into the V-FFN of that layer. The ViT's blocks are pre-LayerNorm and ours post-LayerNorm: the
    MLP sees a normalised input in both, so the block's norm2 affine is folded into the first linear
    layer (W diag(gamma), W beta + b). The shared attention stays the init BERT's (the language side
    needs it; VLMo's vision stage then trains it on images)."""
    model.patches.load_vit(weights, f"model.vision_init {where}")
    blocks = sum(1 for k in weights if k.startswith("blocks.") and k.endswith(".mlp.fc1.weight"))
    if blocks != len(model.layers):
        log.warning("model.vision_init %s: a ViT of %d blocks and a model of %d layers: only its patch embedding is "
                    "used, the V-FFN starts from the init BERT's FFN", where, blocks, len(model.layers))
        return
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            fc1_w, fc1_b = weights[f"blocks.{i}.mlp.fc1.weight"], weights[f"blocks.{i}.mlp.fc1.bias"]
            gamma, beta = weights.get(f"blocks.{i}.norm2.weight"), weights.get(f"blocks.{i}.norm2.bias")
            if gamma is not None:
                fc1_b = fc1_b + fc1_w @ beta
                fc1_w = fc1_w * gamma[None, :]
            ffn = layer.v_ffn
            if fc1_w.shape != ffn.intermediate.dense.weight.shape:
                raise ValueError(f"model.vision_init {where}: block {i}'s MLP is {tuple(fc1_w.shape)}, the model's "
                                 f"FFN {tuple(ffn.intermediate.dense.weight.shape)}")
            ffn.intermediate.dense.weight.copy_(fc1_w)
            ffn.intermediate.dense.bias.copy_(fc1_b)
            ffn.output.dense.weight.copy_(weights[f"blocks.{i}.mlp.fc2.weight"])
            ffn.output.dense.bias.copy_(weights[f"blocks.{i}.mlp.fc2.bias"])
    log.info("initialised VLMo's patch embedding and V-FFN from the ViT in %s", where)


def evaluate(model, builder, urls, tasks, cfg, device, autocast) -> dict:
    from vlp_train.evaluate_vlmo import evaluate_vlmo
    return evaluate_vlmo(model, builder, urls, tasks, cfg, device, autocast)


FAMILY = register(Family(
    name=ARCH, model_class=VLMoModel, build=build, evaluate=evaluate, match_probability=clean_pair_match_probability,
    visual_inputs=VISUAL_INPUTS, dual_encoder=True,
    objectives={Task.IMAGE_TEXT: image_text_losses, Task.IMAGE_ONLY: image_only_losses,
                Task.TEXT_ONLY: text_only_losses, Task.REGION_TAG: region_tag_losses,
                Task.REGION_PHRASE: region_phrase_losses, Task.IMAGE_SENTENCE: image_sentence_losses}))
