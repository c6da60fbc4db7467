"""A trained model as one folder: `save_pretrained(folder)` / `from_pretrained(folder)`.

The folder is laid out as a Hugging Face BERT folder, with more in it:
- `config.json`: BERT's config of the text side (`model_type` bert) plus a `vlp` section: the
  format version, the model family (`arch`) and what the family needs to rebuild its heads
  (feature size, tag vocabulary, ...). `architectures` names the family's model class
  (`SingleStreamModel`, `VLMoModel`, `VLMAEModel`): what the folder is. A single-stream export's
  backbone is a BertModel's (under `bert.`), so `BertModel.from_pretrained(folder)` reads its text
  side; VLMo's weights (experts) and VLMAE's (cross-attention in the fusion layers) are not a BertModel's;
- `model.safetensors`: every weight fine-tuning or a new run loads, heads included (weights shared
  between modules stored once); not what only training needs (a family's `not_exported`: VLMAE's
  momentum encoders, rebuilt as copies of the online ones on load). Checkpoints keep those, for
  exact resume;
- the tokenizer files.

`model.init` may name such a folder or a run folder (its `hf/`): the run starts from the whole model.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from schemas.corpus import bundled_minilm_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SECTION = "vlp"
WEIGHTS = "model.safetensors"
EXPORT_FOLDER = "hf"  # a run's export, inside the run folder


class PretrainedModel:
    """Mixin of every family's model: `arch` (its registry name), `vlp_config()` and
    `from_vlp_config(bert_config, section)`; `tag_rows`: weights whose rows follow the tag vocabulary."""

    arch: str = ""
    tag_rows: tuple[str, ...] = ()
    # weights (by name prefix) a checkpoint keeps, for exact resume, but an export leaves out: what
    # fine-tuning and a run started from the export never read; `rebuild_not_exported` remakes them
    not_exported: tuple[str, ...] = ()

    def rebuild_not_exported(self) -> None:
        """Remake the `not_exported` weights once the exported ones are loaded."""

    def bert_config(self):
        """The BERT config the saved config.json starts from (what BertModel.from_pretrained reads)."""
        return self.bert.config

    def save_pretrained(self, folder: str, tokenizer=None) -> None:
        save(self, folder, tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str):
        model = load(folder)
        if not isinstance(model, cls):
            raise ValueError(f"{folder} holds a {model.arch} model, not a {cls.arch} one")
        return model


@torch.no_grad()
def init_like_bert(module, std: float) -> None:
    """BERT's initialisation (HF BertPreTrainedModel._init_weights) of every fresh module under
    `module`: Linear (and a patch projection's Conv2d) weights N(0, std) with zero biases,
    Embeddings N(0, std) with the padding row zero, LayerNorm weight 1 and bias 0. `std` is the
    BERT config's `initializer_range` (0.02). A model calls it on itself when built; weights an
    init folder holds (BERT, a ViT, a saved model) are loaded over it. Parameters of no such
    module (learned [CLS], mask tokens, position tables) keep their own init."""
    from torch import nn

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def model_folder(path: str) -> str:
    """A run folder stands for its export (RUN/hf); any other path for itself."""
    export = os.path.join(path, EXPORT_FOLDER)
    return export if os.path.isfile(os.path.join(export, "config.json")) else path


def is_vlp_folder(folder: str) -> bool:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return SECTION in json.load(f)


def resolve_init(init: str | None) -> tuple[str, str | None]:
    """model.init -> (kind, folder): ("bert", the bundled MiniLM) for None; ("random", None);
    ("vlp", folder) for a saved model or a run; ("bert", folder) for a HF BERT folder."""
    from vlp_train.backbone import RANDOM_INIT

    if init is None:
        return "bert", bundled_minilm_path()
    if init == RANDOM_INIT:
        return "random", None
    folder = model_folder(os.path.expanduser(init))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model.init {init}: no such folder")
    if is_vlp_folder(folder):
        return "vlp", folder
    if os.path.isdir(os.path.join(folder, "checkpoints")):
        raise FileNotFoundError(f"model.init {init}: a run folder without an export ({EXPORT_FOLDER}/ is written when a "
                                "run ends): finish it with vlp-train run --resume, or name a finished run")
    if os.path.isfile(os.path.join(folder, "vlp_heads.pt")):
        log.warning("model.init %s: an export of an earlier vlp-train (vlp_heads.pt beside a BertModel): only its "
                    "backbone is used; its heads are not read (a pickle) and start random", init)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"model.init {init}: not a model folder (no config.json); give a HF BERT folder, "
                                f"a model saved by vlp-train (RUN/{EXPORT_FOLDER}) or a run folder")
    return "bert", folder


def tokenizer_folder(init: str | None) -> str:
    """Where the run's tokenizer comes from: the init folder when it has one, else the bundled MiniLM's
    (bert-base-uncased's vocabulary)."""
    return tokenizer_in(resolve_init(init)[1])


def tokenizer_in(folder: str | None) -> str:
    """tokenizer_folder of an init already resolved (resolve_init's folder)."""
    return folder if folder and os.path.isfile(os.path.join(folder, "vocab.txt")) else bundled_minilm_path()


def read_config(folder: str):
    """(BertConfig, vlp section) of a saved model folder."""
    from transformers import BertConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no config.json (not a model saved by vlp-train)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    section = data.pop(SECTION, None)
    if not isinstance(section, dict) or "arch" not in section:
        raise ValueError(f"{path}: no '{SECTION}' section: a plain BERT folder, not a whole model saved by vlp-train "
                         "(use it as model.init to start a backbone from it)")
    if int(section.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {section['format_version']}, newer than this vlp-train reads "
                         f"({FORMAT_VERSION}): upgrade vlp-train")
    return BertConfig.from_dict(data), section


def unique_state(model) -> dict[str, torch.Tensor]:
    """The exported state dict: each shared tensor once (under its first name; safetensors stores
    no aliases), without the weights the model does not export (`not_exported`)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name.startswith(model.not_exported):
            continue
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity in seen:
            continue
        seen.add(identity)
        state[name] = tensor.detach().to("cpu").contiguous().clone()
    return state


def save(model, folder: str, tokenizer=None) -> None:
    from safetensors.torch import save_file

    from vlp_train.checkpoint import unwrap
    model = unwrap(model)
    os.makedirs(folder, exist_ok=True)
    config = model.bert_config().to_dict()
    config["architectures"] = [type(model).__name__]  # what the folder holds (see the module's docstring)
    config[SECTION] = {"format_version": FORMAT_VERSION, "arch": model.arch, **model.vlp_config()}
    tmp = os.path.join(folder, WEIGHTS + ".tmp")
    save_file(unique_state(model), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_weights(model, weights: dict[str, torch.Tensor], where: str) -> None:
    """All of the model's exported weights from `weights` (only aliases of stored tensors may be
    absent), then the rest rebuilt (`rebuild_not_exported`). Weights an export no longer carries
    (an earlier export's momentum encoders) are passed over."""
    weights = {k: v for k, v in weights.items() if not k.startswith(model.not_exported)}
    skipped = set(model.state_dict()) - set(unique_state(model))  # aliases, and what is not exported
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.rebuild_not_exported()


def load(folder: str, config=None):
    """The whole model saved in `folder` (or a run folder's export), in eval mode. `config`:
    read_config of that folder when the caller has read it already."""
    from vlp_train.backbone import read_weights
    from vlp_train.families import family_of

    folder = model_folder(folder)
    bert_config, section = config or read_config(folder)
    model_class = family_of(section["arch"]).model_class
    check_architecture(folder, bert_config.architectures, model_class)
    model = model_class.from_vlp_config(bert_config, section)
    load_weights(model, read_weights(folder), folder)
    return model.eval()


def check_architecture(folder: str, named: list[str] | None, model_class) -> None:
    """A folder whose config's `architectures` (`named`, as read_config's BertConfig keeps it) names
    another class than its family's model is refused (a hand-edited or mixed-up config).
    `BertModel` is what exports before this check wrote for all."""
    named = named or []
    if named and named != ["BertModel"] and model_class.__name__ not in named:
        raise ValueError(f"{folder}/config.json: architectures {named} but its vlp section's arch is "
                         f"{model_class.arch} ({model_class.__name__}): the folder's config is inconsistent")


def init_from(folder: str, model_class, cfg_model, feature_dim: int, tags: list[str], config=None):
    """A run's model started from a saved whole model: same family and feature size; the run's
    dropout; tag-indexed heads remapped by tag name when the new corpus's tags differ (tags new to
    the model start random). `config`: read_config(folder) when the caller has read it already
    (its BertConfig takes the run's dropout)."""
    from vlp_train.backbone import check_shape, read_weights

    bert_config, section = config or read_config(folder)
    if section["arch"] != model_class.arch:
        raise ValueError(f"model.init {folder} holds a {section['arch']} model, but model.arch is {model_class.arch}")
    check_architecture(folder, bert_config.architectures, model_class)
    if section.get("feature_dim") != feature_dim:
        raise ValueError(f"model.init {folder} takes {section.get('feature_dim')}-d region features, "
                         f"but this corpus has {feature_dim}-d ones")
    check_shape(bert_config, cfg_model, folder)
    bert_config.hidden_dropout_prob = bert_config.attention_probs_dropout_prob = cfg_model.dropout
    model = model_class.from_vlp_config(bert_config, {**section, "tags": list(tags)})
    weights = read_weights(folder)
    saved_tags = list(section.get("tags", []))
    if saved_tags != list(tags):
        row_of = {tag: i for i, tag in enumerate(saved_tags)}
        fresh = model.state_dict()
        for key in model.tag_rows:
            rows = fresh[key].clone()
            for i, tag in enumerate(tags):
                if tag in row_of:
                    rows[i] = weights[key][row_of[tag]]
            weights[key] = rows
        log.warning("model.init %s: %d of the corpus's %d tags are known to the model; the others start random",
                    folder, sum(t in row_of for t in tags), len(tags))
    load_weights(model, weights, folder)
    log.info("initialised the whole model from %s", folder)
    return model
