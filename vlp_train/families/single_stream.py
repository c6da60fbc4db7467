"""μ-VLA's single-stream model (`model.arch=single_stream`): one BERT over [CLS] text [SEP] +
regions, with the pre-training heads; the three granularities of the paper.

The model returns features; the objectives (vlp_train/objectives/) compute the losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp_train import pretrained
from vlp_train.backbone import BertBackbone, HeadTransform, bert_config, load_bert_init
from vlp_train.evaluate import evaluate
from vlp_train.families import Family, register
from vlp_train.objectives.image_sentence import image_sentence_losses
from vlp_train.objectives.region_phrase import region_phrase_losses
from vlp_train.objectives.region_tag import region_tag_losses
from vlp_train.tasks import Task
from vlp_train.visual import RegionEmbedding

ARCH = "single_stream"


class SingleStreamModel(pretrained.PretrainedModel, nn.Module):
    """Features of [CLS] text [SEP] regions, and the heads:
    MLM (transform + decoder tied to the word embeddings; also the region-to-token head of p-MRTC),
    MRC over the corpus's tags, MRFR back to the feature space, ITM on [CLS]."""

    arch = ARCH
    tag_rows = ("mrc.1.weight", "mrc.1.bias")  # rows by tag: remapped by name when a new corpus's tags differ

    def __init__(self, bert_config, feature_dim: int, tags: list[str]):
        super().__init__()
        self.bert = BertBackbone(bert_config)
        h, eps = bert_config.hidden_size, bert_config.layer_norm_eps
        self.region = RegionEmbedding(feature_dim, bert_config, self.bert.embeddings.token_type_embeddings)
        self.mlm_transform = HeadTransform(h, eps)
        self.mlm_bias = nn.Parameter(torch.zeros(bert_config.vocab_size))
        self.mrc = nn.Sequential(HeadTransform(h, eps), nn.Linear(h, max(len(tags), 1)))
        self.mrfr = nn.Sequential(HeadTransform(h, eps), nn.Linear(h, feature_dim))
        self.itm = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 2))
        self.feature_dim, self.tags = feature_dim, list(tags)
        self._init_new(bert_config.initializer_range)

    @property
    def num_tags(self) -> int:
        return len(self.tags)

    def _init_new(self, std: float):
        for module in (self.region, self.mlm_transform, self.mrc, self.mrfr, self.itm):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    nn.init.zeros_(m.bias)

    # -- what from_pretrained needs to rebuild it ------------------------------------------------

    def vlp_config(self) -> dict:
        return {"feature_dim": self.feature_dim, "tags": self.tags}

    @classmethod
    def from_vlp_config(cls, bert_config, section: dict) -> "SingleStreamModel":
        return cls(bert_config, section["feature_dim"], section["tags"])

    def set_layer_call(self, call) -> None:
        """How each transformer layer is called (compile.CompiledLayers swaps in a compiled one)."""
        self.bert.call_layer = call

    # -- features and heads --------------------------------------------------------------------

    def forward(self, input_ids, text_mask, features, locations, region_mask):
        """-> (text states [B, T, D], region states [B, R, D])."""
        text = self.bert.embeddings(input_ids)
        regions = self.region(features, locations)
        hidden = self.bert.encode(torch.cat([text, regions], 1), torch.cat([text_mask, region_mask], 1))
        return hidden[:, :input_ids.shape[1]], hidden[:, input_ids.shape[1]:]

    def mlm_logits(self, states):
        """Over the BERT vocabulary, decoder tied to the word embeddings (text and p-MRTC)."""
        return self.mlm_transform(states) @ self.bert.embeddings.word_embeddings.weight.T + self.mlm_bias

    def itm_logits(self, text_states):
        return self.itm(text_states[:, 0])


def build(cfg_model, feature_dim: int, tags: list[str]) -> SingleStreamModel:
    """A model initialised as model.init says (vlp_train/backbone.py, vlp_train/pretrained.py)."""
    kind, folder = pretrained.resolve_init(cfg_model.init)
    if kind == "vlp":
        return pretrained.init_from(folder, SingleStreamModel, cfg_model, feature_dim, tags)
    model = SingleStreamModel(bert_config(cfg_model, folder), feature_dim, tags)
    if folder is not None:
        load_bert_init(model.bert, model.mlm_transform, model.mlm_bias, folder)
    return model


@torch.no_grad()
def match_probability(model: SingleStreamModel, view: dict) -> torch.Tensor:
    """The model's ITM match probability of each sample's clean (unmasked) pair, with dropout off:
    a weight is the model's judgement of the pair, not a random draw. (The layer scope's no-grad
    eval graph is the evaluation's; the step scope traces the mode switch into its graph, which
    torch.compile does without a break.)"""
    was_training = model.training
    model.eval()
    try:
        text, _ = model(view["clean_ids"], view.get("clean_text_mask", view["text_mask"]), view["features"],
                        view["locations"], view["region_mask"])
    finally:
        model.train(was_training)
    return F.softmax(model.itm_logits(text).float(), dim=-1)[:, 1]


FAMILY = register(Family(
    name=ARCH, model_class=SingleStreamModel, build=build, evaluate=evaluate, match_probability=match_probability,
    objectives={Task.REGION_TAG: region_tag_losses, Task.REGION_PHRASE: region_phrase_losses,
                Task.IMAGE_SENTENCE: image_sentence_losses}))
