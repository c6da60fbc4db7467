"""The BERT backbone every family builds on: HF `BertModel`'s embeddings and encoder, written over
`F.scaled_dot_product_attention` with a padding mask, with HF's parameter names (weights load from
any HF BERT folder and export back to one), and the loading of a run's initial BERT.

`model.init` (see `resolve_init`): None = the bundled MiniLM (6 x 384); `random` = a random BERT of
`model.layers/hidden/heads` (asked for on purpose); a HF BERT folder (its backbone, and BERT's MLM
head when the folder holds `cls.predictions.*`); a vlp model folder or a run folder (the whole
model: vlp_train/pretrained.py).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from schemas.corpus import bundled_minilm_path

log = logging.getLogger(__name__)

RANDOM_INIT = "random"


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


class BertAttention(nn.Module):
    """BERT's post-LayerNorm attention sub-layer (HF's names: `self.query/key/value`,
    `output.dense/LayerNorm`): x attends to itself, or to `context` (a cross-attention, whose
    key/value layers may take another width), then dropout, residual and LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _Output(cfg.hidden_size, cfg)
        self.heads = cfg.num_attention_heads
        self.dropout, self.attn_dropout = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob

    def forward(self, x, attn_mask, context=None):
        """x [B, N, D]; attn_mask [B, 1, 1, M] True where a key is real; context [B, M, *] (None: x)."""
        b, n, d = x.shape
        context = x if context is None else context
        a = self.self

        def split(states):  # [B, L, D] -> [B, heads, L, D / heads]
            return states.view(b, states.shape[1], self.heads, d // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(split(a.query(x)), split(a.key(context)), split(a.value(context)),
                                             attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0)
        out = self.output
        return out.LayerNorm(x + F.dropout(out.dense(ctx.transpose(1, 2).reshape(b, n, d)), self.dropout, self.training))


class _Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


def feed_forward(block: nn.Module, x):
    """BERT's FFN sub-layer over `block`'s `intermediate` and `output` (a BertLayer's, HF's names at
    the layer's top level, or a FeedForward's): dense -> GELU -> dense, dropout, residual, LayerNorm."""
    h = F.gelu(block.intermediate.dense(x))
    return block.output.LayerNorm(x + F.dropout(block.output.dense(h), block.dropout, block.training))


class FeedForward(nn.Module):
    """BERT's FFN sub-layer as a module of its own (VLMo's experts), with a BERT layer's names
    (`intermediate.dense`, `output.dense/LayerNorm`), so a BERT layer's FFN loads into it."""

    def __init__(self, cfg):
        super().__init__()
        self.intermediate = _Intermediate(cfg)
        self.output = _Output(cfg.intermediate_size, cfg)
        self.dropout = cfg.hidden_dropout_prob

    def forward(self, x):
        return feed_forward(self, x)


class BertLayer(nn.Module):
    """HF's BertLayer: the attention sub-layer, then the FFN (`intermediate`, `output`)."""

    def __init__(self, cfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _Output(cfg.intermediate_size, cfg)
        self.dropout = cfg.hidden_dropout_prob

    def forward(self, x, attn_mask):
        return feed_forward(self, self.attention(x, attn_mask))


class _Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


def call_layer(layer: nn.Module, hidden, *args):
    """How a model calls a transformer layer (or a layer's sub-layer: VLMo's attention and experts):
    the trainer swaps in one compiled call for all of them (compile.CompiledLayers)."""
    return layer(hidden, *args)


class BertBackbone(nn.Module):
    """BertModel's embeddings + encoder, parameter-name compatible with Hugging Face."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = _Encoder(cfg)
        # how each layer is called: the trainer swaps in one compiled call shared by every
        # layer (compile.CompiledLayers); not a module, so the state dict is the same either way
        self.call_layer = call_layer

    def encode(self, hidden, padding_mask):
        """hidden [B, N, D]; padding_mask [B, N] True for real positions."""
        attn_mask = padding_mask[:, None, None, :]  # broadcast over heads and queries
        for layer in self.encoder.layer:
            hidden = self.call_layer(layer, hidden, attn_mask)
        return hidden


class HeadTransform(nn.Module):
    """Dense + GELU + LayerNorm: the transform in front of BERT's MLM decoder (and of our other heads)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class PretrainingHeads:
    """The pre-training heads every family shares (a mixin of the family's nn.Module): MLM (transform +
    decoder tied to the word embeddings; also p-MRTC's region-to-token head), MRC over the corpus's
    tags, MRFR back to the region feature space (or a patch's pixels), ITM on the fused [CLS].
    Attribute names are BERT's and the checkpoints' (mlm_transform, mlm_bias, mrc, mrfr, itm)."""

    def add_pretraining_heads(self, hidden: int, eps: float, vocab_size: int, tags: list[str], regression_dim: int,
                              itm_pooler: bool = True) -> None:
        """`itm_pooler`: ITM through BERT's pooler (Linear + tanh) first, else one Linear."""
        self.mlm_transform = HeadTransform(hidden, eps)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.mrc = nn.Sequential(HeadTransform(hidden, eps), nn.Linear(hidden, max(len(tags), 1)))
        self.mrfr = nn.Sequential(HeadTransform(hidden, eps), nn.Linear(hidden, regression_dim))
        self.itm = (nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2)) if itm_pooler
                    else nn.Linear(hidden, 2))
        self.tags = list(tags)

    @property
    def regresses_pixels(self) -> bool:
        """MRFR's target: the masked patches' pixels when the corpus has no region features."""
        return getattr(self, "patches", None) is not None and not self.feature_dim

    def word_embeddings(self) -> nn.Embedding:
        """The input word embeddings the MLM decoder is tied to."""
        raise NotImplementedError

    def mlm_logits(self, states):
        """Over the BERT vocabulary, decoder tied to the word embeddings (text and p-MRTC)."""
        return self.mlm_transform(states) @ self.word_embeddings().weight.T + self.mlm_bias

    def itm_logits(self, text_states):
        return self.itm(text_states[:, 0])


def shape_of(config) -> tuple[int, int, int]:
    return config.num_hidden_layers, config.hidden_size, config.num_attention_heads


def check_shape(config, cfg_model, folder: str) -> None:
    """An init folder (BERT or a saved model) of another shape than model.layers/hidden/heads ask
    for is an error, never a silent random model."""
    asked = (cfg_model.layers, cfg_model.hidden, cfg_model.heads)
    if cfg_model.layers > 0 and shape_of(config) != asked:
        raise ValueError(f"model.init {folder} is a {'x'.join(map(str, shape_of(config)[:2]))} model "
                         f"({config.num_attention_heads} heads) but model.layers/hidden/heads ask for "
                         f"{asked[0]} x {asked[1]} ({asked[2]} heads): give model.init a folder of that shape "
                         f"(bert-base-uncased for the paper's 12 x 768), or model.init={RANDOM_INIT} to train "
                         "one from random weights on purpose")


def bert_config(cfg_model, folder: str | None):
    """The run's BertConfig: `folder`'s (a HF BERT folder), or with folder None (model.init=random)
    a fresh one of model.layers/hidden/heads (default: the bundled MiniLM's shape) with the
    bundled vocabulary. A folder of another shape than model.layers/hidden/heads ask for is an error,
    never a silent random model."""
    from transformers import BertConfig

    config = BertConfig.from_pretrained(folder or bundled_minilm_path())
    if folder is None and cfg_model.layers > 0:
        config = BertConfig(vocab_size=config.vocab_size, hidden_size=cfg_model.hidden,
                            num_hidden_layers=cfg_model.layers, num_attention_heads=cfg_model.heads,
                            intermediate_size=4 * cfg_model.hidden, max_position_embeddings=512)
    elif folder is not None:
        check_shape(config, cfg_model, folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg_model.dropout
    return config


def read_weights(folder: str, what: str = "model.init") -> dict[str, torch.Tensor]:
    """The tensors of a HF model folder (safetensors, else a PyTorch .bin read with weights_only:
    never unpickle a user file), with TF-era LayerNorm names (`gamma`/`beta`, as bert-base-uncased's
    files still have them) renamed to `weight`/`bias`, as transformers does on load. `what`: the
    setting that named the folder, for the errors (a BERT's model.init, a ViT's model.vision_init)."""
    safetensors = os.path.join(folder, "model.safetensors")
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors):
        from safetensors.torch import load_file
        weights = load_file(safetensors)
    elif os.path.isfile(binary):
        weights = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{what} {folder}: no model.safetensors or pytorch_model.bin")
    renamed = {}
    for name, tensor in weights.items():
        if "LayerNorm." in name and name.endswith((".gamma", ".beta")):
            name = name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
            if name in weights:
                raise ValueError(f"{what} {folder}: holds both {name} and its legacy gamma/beta name")
        renamed[name] = tensor
    return renamed


def bert_parts(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A HF BERT folder's weights -> (its backbone's, under BertModel's names: a BertForPreTraining
    folder's `bert.` prefix dropped, the pooler and heads left out; its MLM head's, `cls.predictions.*`
    without that prefix: empty when the folder has none)."""
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
    backbone = {k[len(prefix):]: v for k, v in weights.items()
                if k.startswith(prefix) and not k[len(prefix):].startswith(("pooler.", "cls."))}
    head = {k[len("cls.predictions."):]: v for k, v in weights.items() if k.startswith("cls.predictions.")}
    return backbone, head


def load_mlm_head(head: dict[str, torch.Tensor], mlm_transform: HeadTransform, mlm_bias: nn.Parameter) -> bool:
    """BERT's pre-trained MLM head (`bert_parts`' second part) into a model's transform and bias (the
    decoder is tied to the word embeddings); False, loading nothing, when the folder had none."""
    if "transform.dense.weight" not in head:
        return False
    mlm_transform.load_state_dict({k[len("transform."):]: v for k, v in head.items() if k.startswith("transform.")})
    with torch.no_grad():
        mlm_bias.copy_(head["bias"])
    return True


def load_bert_init(backbone: BertBackbone, mlm_transform: HeadTransform, mlm_bias: nn.Parameter, folder: str,
                   new: tuple[str, ...] = ()) -> bool:
    """Load a HF BERT folder into the backbone, and BERT's pre-trained MLM head (transform and
    bias; the decoder is tied to the word embeddings) when the folder has one
    (`cls.predictions.*`, as bert-base-uncased from BertForPreTraining). True when the head was there.
    `new`: name parts of backbone weights BERT has not (e.g. vlmae's `crossattention`): they start random."""
    backbone_weights, head = bert_parts(read_weights(folder))
    missing, _ = backbone.load_state_dict(backbone_weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and not any(part in k for part in new)]
    if missing:
        raise RuntimeError(f"model.init {folder} lacks backbone weights: {missing[:5]}")
    if not load_mlm_head(head, mlm_transform, mlm_bias):
        log.info("initialised the backbone from %s (no MLM head there: the head starts random)", folder)
        return False
    log.info("initialised the backbone and BERT's MLM head from %s", folder)
    return True
