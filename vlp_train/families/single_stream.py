"""μ-VLA's single-stream model (`model.arch=single_stream`): one BERT over [CLS] text [SEP] +
the image (`model.visual`: its detector regions, its 16x16 patches, or both), with the
pre-training heads; the three granularities of the paper.

On patches a region is the set of patches its box covers (`visual.box_patches`): masking a region
masks those patches (and zeroes its features in `both`), and the region's state, which MRC, MRFR
and p-MRTC read, is the mean of its patches' states (in `both`, averaged with its region token's).

The model returns features; the objectives (vlp_train/objectives/) compute the losses.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from vlp_train import pretrained
from vlp_train.config import VISUAL_INPUTS
from vlp_train.backbone import BertBackbone, PretrainingHeads, bert_config, load_bert_init
from vlp_train.evaluate import evaluate
from vlp_train.families import Family, clean_pair_match_probability, register
from vlp_train.objectives.image_sentence import image_sentence_losses
from vlp_train.objectives.region_phrase import region_phrase_losses
from vlp_train.objectives.region_tag import region_tag_losses
from vlp_train.tasks import Task
from vlp_train.visual import IMAGENET_MEAN, IMAGENET_STD, PatchEmbedding, PatchRegions, RegionEmbedding, patch_settings, \
    pixel_stats, read_vision_init

ARCH = "single_stream"
log = logging.getLogger(__name__)


class SingleStreamModel(PatchRegions, PretrainingHeads, pretrained.PretrainedModel, nn.Module):
    """Features of [CLS] text [SEP] + regions / [visual CLS] patches / both, and the heads:
    MLM (transform + decoder tied to the word embeddings; also the region-to-token head of p-MRTC),
    MRC over the corpus's tags, MRFR back to the feature space (on patches without region
    features, feature_dim 0: a patch's normalised pixels), ITM on [CLS]."""

    arch = ARCH
    tag_rows = ("mrc.1.weight", "mrc.1.bias")  # rows by tag: remapped by name when a new corpus's tags differ

    def __init__(self, bert_config, feature_dim: int, tags: list[str], visual: str = "regions", image_size: int = 384,
                 patch_size: int = 16, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
        super().__init__()
        if visual not in VISUAL_INPUTS:
            raise ValueError(f"model.visual={visual!r}: expected one of {VISUAL_INPUTS}")
        self.bert = BertBackbone(bert_config)
        h, eps = bert_config.hidden_size, bert_config.layer_norm_eps
        token_type = self.bert.embeddings.token_type_embeddings
        self.visual = visual
        self.region = RegionEmbedding(feature_dim, bert_config, token_type) if visual != "patches" else None
        self.patches = PatchEmbedding(h, image_size, patch_size, token_type, eps, bert_config.hidden_dropout_prob,
                                      pixel_mean, pixel_std) if visual != "regions" else None
        self.add_pretraining_heads(h, eps, bert_config.vocab_size, tags, feature_dim or 3 * patch_size ** 2)
        self.feature_dim = feature_dim
        self._init_new(bert_config.initializer_range)

    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def _init_new(self, std: float):
        pretrained.init_like_bert(self, std)  # an init folder's weights are loaded over it (build)

    # -- what from_pretrained needs to rebuild it ------------------------------------------------

    def vlp_config(self) -> dict:
        config = {"feature_dim": self.feature_dim, "tags": self.tags, "visual": self.visual}
        if self.patches is not None:
            config.update(self.patches.settings())
        return config

    @classmethod
    def from_vlp_config(cls, bert_config, section: dict) -> "SingleStreamModel":
        # a model saved before model.visual existed is a regions model
        return cls(bert_config, section["feature_dim"], section["tags"], section.get("visual", "regions"),
                   *patch_settings(section))

    def set_layer_call(self, call) -> None:
        """How each transformer layer is called (compile.CompiledLayers swaps in a compiled one)."""
        self.bert.call_layer = call

    # -- features and heads --------------------------------------------------------------------

    def forward(self, input_ids, text_mask, features, locations, region_mask, pixels=None, masked_regions=None):
        """-> (text states [B, T, D], region states [B, R, D]); see `encode`."""
        text, regions, _ = self.encode(input_ids, text_mask, features, locations, region_mask, pixels, masked_regions)
        return text, regions

    def encode(self, input_ids, text_mask, features, locations, region_mask, pixels=None, masked_regions=None):
        """-> (text states [B, T, D], region states [B, R, D], patch states [B, 1 + N, D] with the
        visual [CLS] first, or None without patches). `features` are the region features the model
        sees (zeroed where masked: objectives.input_features); `masked_regions` [B, R]: the regions
        whose patches the model does not see (patches, both). A region's state is its token's
        (regions), the mean of its patches' (patches), or the mean of the two (both)."""
        parts, masks = [self.bert.embeddings(input_ids)], [text_mask]
        if self.region is not None:
            parts.append(self.region(features, locations))
            masks.append(region_mask)
        if self.patches is not None:
            parts.append(self.embed_patches(pixels, locations, region_mask, masked_regions))
            masks.append(text_mask.new_ones(pixels.shape[0], 1 + self.patches.num_patches))
        hidden = self.bert.encode(torch.cat(parts, 1), torch.cat(masks, 1))
        t = input_ids.shape[1]
        text, visual = hidden[:, :t], hidden[:, t:]
        if self.patches is None:
            return text, visual, None
        patches = visual[:, visual.shape[1] - 1 - self.patches.num_patches:]
        regions = self.region_states(patches[:, 1:], locations, region_mask,
                                     None if self.region is None else visual[:, :region_mask.shape[1]])
        return text, regions, patches


def build(cfg_model, feature_dim: int, tags: list[str]) -> SingleStreamModel:
    """A model initialised as model.init says (vlp_train/backbone.py, vlp_train/pretrained.py)."""
    kind, folder = pretrained.resolve_init(cfg_model.init)
    vit = read_vision_init(cfg_model)
    if kind == "vlp":
        model = pretrained.init_from(folder, SingleStreamModel, cfg_model, feature_dim, tags)
        saved = (model.visual, *((model.patches.image_size, model.patches.patch_size) if model.patches else ()))
        asked = (cfg_model.visual, *((cfg_model.image_size, cfg_model.patch_size) if cfg_model.visual != "regions" else ()))
        if saved != asked:
            raise ValueError(f"model.init {folder} sees images as {_describe(saved)}, but model.visual/image_size/"
                             f"patch_size ask for {_describe(asked)}: set them as the saved model has them")
        if vit is not None:
            log.warning("model.vision_init %s is not used: model.init %s holds the whole model, patch embedding "
                        "included", cfg_model.vision_init, folder)
        return model
    mean, std = pixel_stats(vit)
    model = SingleStreamModel(bert_config(cfg_model, folder), feature_dim, tags, cfg_model.visual,
                              cfg_model.image_size, cfg_model.patch_size, mean, std)
    if folder is not None:
        load_bert_init(model.bert, model.mlm_transform, model.mlm_bias, folder)
    if vit is not None:
        model.patches.load_vit(vit[0], f"model.vision_init {cfg_model.vision_init}")
        log.info("initialised the patch embedding from the ViT in %s", cfg_model.vision_init)
    return model


def _describe(visual: tuple) -> str:
    return visual[0] if len(visual) == 1 else f"{visual[0]} ({visual[1]} px images, {visual[2]} px patches)"


FAMILY = register(Family(
    name=ARCH, model_class=SingleStreamModel, build=build, evaluate=evaluate, match_probability=clean_pair_match_probability,
    visual_inputs=VISUAL_INPUTS,
    objectives={Task.REGION_TAG: region_tag_losses, Task.REGION_PHRASE: region_phrase_losses,
                Task.IMAGE_SENTENCE: image_sentence_losses}))
