"""The whole model as one folder (save_pretrained / from_pretrained), starting runs from it, BERT's
MLM head from an init folder, and the base preset's refusal to train a random BERT by accident."""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertForPreTraining, BertModel

from vlp_train import pretrained
from vlp_train.cli import main
from vlp_train.config import OptimConfig, DataConfig, load_config, per_rank_batch
from vlp_train.families import build_model
from vlp_train.families.single_stream import SingleStreamModel
from vlp_train.train import train

from .conftest import DIM, TAGS, TINY_MODEL, write_shards


def rows(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def outputs(model, seed: int = 0):
    """Every head's output on one fixed batch (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[101, 1037, 4937, 2279, 2000, 1037, 3899, 102]])
    text_mask = torch.ones_like(ids, dtype=torch.bool)
    feats = torch.randn(1, 3, model.feature_dim, generator=g)
    locs = torch.rand(1, 3, 5, generator=g)
    region_mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        text, regions = model(ids, text_mask, feats, locs, region_mask)
        return {"text": text, "regions": regions, "mlm": model.mlm_logits(text), "mrc": model.mrc(regions),
                "mrfr": model.mrfr(regions), "itm": model.itm_logits(text)}


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """A debug run (the bundled 6 x 384 MiniLM) of 2 steps on tiny shards."""
    folder = tmp_path_factory.mktemp("debug")
    shards = write_shards(str(folder / "c"), n_images=16, per_shard=16)
    cfg = load_config("debug", ["optim.max_steps=2", "data.batch_size=8", "model.compile=off"])
    cfg.data.shards, cfg.run.output = shards, str(folder / "run")
    train(cfg)
    return cfg


def test_the_export_restores_the_whole_model_and_bert_reads_its_backbone(debug_run):
    out = debug_run.run.output
    state = torch.load(os.path.join(out, "checkpoints", "step-00000002.pt"), weights_only=True)
    trained = build_model(debug_run.model, DIM, sorted(TAGS))
    trained.load_state_dict(state["model"])
    trained.eval()
    for path in (out, os.path.join(out, "hf")):  # a run folder stands for its export
        restored = SingleStreamModel.from_pretrained(path)
        assert restored.tags == sorted(TAGS) and restored.feature_dim == DIM and not restored.training
        for name, value in outputs(trained).items():
            torch.testing.assert_close(outputs(restored)[name], value, rtol=0, atol=0, msg=name)
    with open(os.path.join(out, "hf", "config.json")) as f:
        section = json.load(f)["vlp"]
    assert section["format_version"] == pretrained.FORMAT_VERSION and section["arch"] == "single_stream"
    bert = BertModel.from_pretrained(os.path.join(out, "hf")).eval()  # the text side alone
    assert bert.config.num_hidden_layers == 6 and bert.config.hidden_size == 384
    ids = torch.tensor([[101, 1037, 4937, 2279, 2000, 1037, 3899, 102]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    ours = trained.bert.encode(trained.bert.embeddings(ids), mask)
    theirs = bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_newer_format_is_refused_with_a_clear_message(debug_run, tmp_path):
    import shutil
    copy = tmp_path / "newer"
    shutil.copytree(os.path.join(debug_run.run.output, "hf"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["vlp"]["format_version"] = pretrained.FORMAT_VERSION + 1
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer than this vlp-train reads"):
        pretrained.load(str(copy))


def test_a_run_starts_from_a_saved_model_whole_with_its_tags_remapped(debug_run, tmp_path):
    """model.init = a run folder: every weight comes from it; a corpus with other tags keeps the
    MRC rows of the tags both know (by name) and starts the new ones afresh."""
    saved = pretrained.load(debug_run.run.output)
    cfg = load_config("debug", [f"model.init={debug_run.run.output}"])
    same = build_model(cfg.model, DIM, sorted(TAGS))
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(same.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    other_tags = ["zebra", "dog", "cat"]  # dog and cat known, zebra new
    remapped = build_model(cfg.model, DIM, other_tags)
    old_row = {t: i for i, t in enumerate(sorted(TAGS))}
    weight = remapped.state_dict()["mrc.1.weight"]
    for i, tag in enumerate(other_tags):
        same_row = torch.equal(weight[i], saved.state_dict()["mrc.1.weight"][old_row[tag]]) if tag in old_row else False
        assert same_row == (tag in old_row), tag
    with pytest.raises(ValueError, match="has 32-d ones"):
        build_model(cfg.model, 32, sorted(TAGS))


def test_cli_init_trains_from_a_run_folder(debug_run, tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=16, per_shard=16)
    result = CliRunner().invoke(main, ["run", "--shards", shards, "--output", str(tmp_path / "next"),
                                       "--init", debug_run.run.output, "--set", "optim.max_steps=1",
                                       "--set", "data.batch_size=8"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "next" / "config.json").read_text())["model"]["init"] == debug_run.run.output


def test_bert_pretraining_heads_initialise_the_mlm_head(tmp_path):
    """An init folder saved from BertForPreTraining (as bert-base-uncased is) gives the MLM
    transform and bias; a folder without them leaves the head to start random."""
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(0)
    source = BertForPreTraining(config)
    with torch.no_grad():
        source.cls.predictions.bias.uniform_(-1, 1)
    source.save_pretrained(tmp_path / "bert")
    cfg = load_config("debug", [f"model.init={tmp_path / 'bert'}"])
    model = build_model(cfg.model, DIM, TAGS)
    head = source.cls.predictions
    torch.testing.assert_close(model.mlm_transform.dense.weight, head.transform.dense.weight)
    torch.testing.assert_close(model.mlm_transform.LayerNorm.weight, head.transform.LayerNorm.weight)
    torch.testing.assert_close(model.mlm_bias, head.bias)
    torch.testing.assert_close(model.bert.encoder.layer[1].output.dense.weight,
                               source.bert.encoder.layer[1].output.dense.weight)
    BertModel(config).save_pretrained(tmp_path / "plain")
    plain = build_model(load_config("debug", [f"model.init={tmp_path / 'plain'}"]).model, DIM, TAGS)
    assert not torch.allclose(plain.mlm_transform.dense.weight, head.transform.dense.weight)
    assert torch.all(plain.mlm_bias == 0)


def test_a_shape_other_than_the_init_folders_is_an_error_not_a_random_model():
    cfg = load_config("debug", ["model.layers=12", "model.hidden=768", "model.heads=12"])
    with pytest.raises(ValueError, match="model.init=random"):
        build_model(cfg.model, DIM, TAGS)
    random_cfg = load_config("debug", ["model.layers=2", "model.hidden=64", "model.heads=2", "model.init=random"])
    assert build_model(random_cfg.model, DIM, TAGS).bert.config.num_hidden_layers == 2


def test_base_refuses_to_start_without_model_init_and_trains_with_random(tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=16, per_shard=16)
    runner = CliRunner()
    common = ["run", "--config", "base", "--shards", shards, "--set", "model.feature_dim=0",
              "--set", "data.num_workers=0", "--set", "data.batch_size=8", "--set", "data.global_batch_size=8",
              "--set", "optim.max_steps=1", "--set", "run.eval_batches=1"]
    refused = runner.invoke(main, common + ["--output", str(tmp_path / "refused")])
    assert refused.exit_code != 0 and "model.init" in refused.output and "random" in refused.output
    assert not os.path.exists(tmp_path / "refused")
    ok = runner.invoke(main, common + ["--output", str(tmp_path / "random"), "--set", "model.init=random"])
    assert ok.exit_code == 0, ok.output
    restored = pretrained.load(str(tmp_path / "random"))
    assert (restored.bert.config.num_hidden_layers, restored.bert.config.hidden_size) == (12, 768)
    config = load_config("base")
    assert config.optim.epochs == 20 and config.data.global_batch_size == 480


@pytest.mark.parametrize("world, limit, expected", [(1, 480, (480, 1)), (8, 480, (60, 1)), (4, 480, (120, 1)),
                                                     (1, 100, (96, 5)), (2, 64, (60, 4)), (3, 1000, (160, 1))])
def test_a_global_batch_is_split_over_ranks_and_accumulation(world, limit, expected):
    data = DataConfig(batch_size=limit, global_batch_size=480)
    micro, accum = per_rank_batch(data, OptimConfig(), world)
    assert (micro, accum) == expected and micro * accum * world == 480


def test_a_global_batch_that_does_not_divide_or_clashes_with_grad_accum_is_refused():
    with pytest.raises(ValueError, match="does not divide over 7 ranks"):
        per_rank_batch(DataConfig(global_batch_size=480), OptimConfig(), 7)
    with pytest.raises(ValueError, match="set one of them"):
        per_rank_batch(DataConfig(global_batch_size=480), OptimConfig(grad_accum=2), 1)
    assert per_rank_batch(DataConfig(batch_size=32), OptimConfig(grad_accum=3), 4) == (32, 3)  # no global batch


def test_a_global_batch_runs_its_accumulated_steps(tmp_path):
    """data.global_batch_size=16 with data.batch_size=8 on one process: 2 micro-batches a step, so
    32 training samples make 2 steps an epoch."""
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    cfg = load_config("debug", TINY_MODEL + ["data.batch_size=8", "data.global_batch_size=16", "optim.epochs=2",
                                             "optim.max_steps=0", "run.log_every=1"])
    cfg.data.shards, cfg.run.output = shards, str(tmp_path / "run")
    assert train(cfg)["steps"] == 4
    assert [round(r["samples_per_s"] > 0) for r in rows(cfg.run.output) if "loss" in r] == [1] * 4


def test_legacy_layernorm_names_load(tmp_path):
    """bert-base-uncased's own files still name LayerNorm weights gamma/beta (TF-era); transformers
    renames them on load, and so does model.init: backbone and MLM head alike."""
    from safetensors.torch import load_file, save_file
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(1)
    source = BertForPreTraining(config)
    source.save_pretrained(tmp_path / "bert")
    path = tmp_path / "bert" / "model.safetensors"
    weights = load_file(path)
    legacy = {(k[:-len(".weight")] + ".gamma" if "LayerNorm" in k and k.endswith(".weight") else
               k[:-len(".bias")] + ".beta" if "LayerNorm" in k and k.endswith(".bias") else k): v
              for k, v in weights.items()}
    assert any(k.endswith(".gamma") for k in legacy)
    save_file(legacy, path, metadata={"format": "pt"})
    model = build_model(load_config("debug", [f"model.init={tmp_path / 'bert'}"]).model, DIM, TAGS)
    torch.testing.assert_close(model.bert.embeddings.LayerNorm.weight, source.bert.embeddings.LayerNorm.weight)
    torch.testing.assert_close(model.mlm_transform.LayerNorm.bias, source.cls.predictions.transform.LayerNorm.bias)


def _tiny(arch: str):
    """A small model of each family (random weights, seeded)."""
    from vlp_train.families.vlmae import VLMAEModel
    from vlp_train.families.vlmo import VLMoModel
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    if arch == "single_stream":
        return SingleStreamModel(config, DIM, sorted(TAGS))
    if arch == "vlmo":
        return VLMoModel(config, DIM, sorted(TAGS), vl_layers=1)
    return VLMAEModel(config, {"feature_dim": DIM, "tags": sorted(TAGS), "fusion_layers": 1, "vision": [1, 32, 2],
                               "decoder": [1, 16, 2]})


@pytest.mark.parametrize("arch,model_class", [("single_stream", "SingleStreamModel"), ("vlmo", "VLMoModel"),
                                              ("vlmae", "VLMAEModel")])
def test_each_familys_export_says_what_it_is_and_loads_as_that_family(tmp_path, arch, model_class):
    from safetensors import safe_open
    model = _tiny(arch).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == [model_class] and config["vlp"]["arch"] == arch
    restored = pretrained.load(str(tmp_path / "hf"))
    assert type(restored).__name__ == model_class and restored.arch == arch
    with safe_open(str(tmp_path / "hf" / pretrained.WEIGHTS), "pt") as f:
        stored = set(f.keys())
    theirs = restored.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(theirs[name], value, rtol=0, atol=0, msg=name)
    if arch != "vlmae":
        return
    # VLMAE: the momentum encoders are training's, in checkpoints (the state dict), not in the export
    assert any(k.startswith("momentum_") for k in model.state_dict())
    assert not any(k.startswith("momentum_") for k in stored)


def test_an_export_starts_vlmaes_momentum_encoders_as_copies_and_reads_an_older_export_that_held_them(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _tiny("vlmae")
    with torch.no_grad():  # a trained model's EMA differs from its online encoders
        for p in model.momentum_vision.parameters():
            p.add_(1.0)
    model.save_pretrained(str(tmp_path / "hf"))
    restored = pretrained.load(str(tmp_path / "hf"))
    torch.testing.assert_close(restored.momentum_vision.blocks[0].attn.qkv.weight, model.vision.blocks[0].attn.qkv.weight)
    # an export written before momentum encoders were left out (and `architectures` was BertModel)
    weights = load_file(str(tmp_path / "hf" / pretrained.WEIGHTS))
    weights.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith("momentum_")})
    save_file(weights, str(tmp_path / "hf" / pretrained.WEIGHTS))
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    config["architectures"] = ["BertModel"]
    with open(tmp_path / "hf" / "config.json", "w") as f:
        json.dump(config, f)
    assert type(pretrained.load(str(tmp_path / "hf"))).__name__ == "VLMAEModel"
    config["architectures"] = ["VLMoModel"]  # contradicts its arch: refused
    with open(tmp_path / "hf" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="architectures.*VLMoModel.*vlmae"):
        pretrained.load(str(tmp_path / "hf"))


@pytest.mark.parametrize("preset,extra", [("debug", []), ("vlmo-debug", ["model.visual=both"]),
                                          ("vlmae-debug", ["model.vision_hidden=64", "model.vision_heads=2"])])
def test_a_random_model_of_every_family_starts_as_bert_initialises(preset, extra):
    """model.init=random: BERT's init (initializer_range 0.02) everywhere, the word embeddings too
    (PyTorch's default N(0, 1) embeddings made the first MLM logits ~50x too large)."""
    cfg = load_config(preset, TINY_MODEL + extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, DIM, sorted(TAGS))
    words = model.word_embeddings()
    assert abs(words.weight.std().item() - 0.02) < 0.002
    assert words.padding_idx is None or not words.weight[words.padding_idx].any()
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)) and m.weight.numel() >= 1000:
            assert abs(m.weight.std().item() - 0.02) < 0.004, name
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
            assert not m.bias.any(), name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any(), name
