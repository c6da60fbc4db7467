"""VLMo (model.arch=vlmo): expert routing, initialisation from BERT, the stages' frozen parameters,
the language stage's text stream, exact resume, and a debug run of each stage."""
import json
import os
import random
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import schemas
from vlp_train.cli import main
from vlp_train.components import build_run
from vlp_train.config import load_config
from vlp_train.families.vlmo import L, V, VL, VLMoModel, load_bert_weights
from vlp_train.step import compute_loss, to_device
from vlp_train.tasks import Task
from vlp_train.train import optimizer_step, train

from .conftest import TINY_MODEL, TINY_PATCHES, write_shards

VLMO = TINY_MODEL + ["model.vl_layers=1", "data.batch_size=8", "run.log_every=1", "run.eval_batches=1",
                     "run.rerank_k=4"]


def small_model(layers=4, vl_layers=2, stage="vl", **visual):
    from transformers import BertConfig
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return VLMoModel(config, feature_dim=6, tags=["cat", "dog"], vl_layers=vl_layers, stage=stage, **visual)


def write_sentences(corpus: str, texts: list[str], files: int = 1) -> str:
    """CORPUS/sentences/sentences-*.parquet, as the pipeline writes them."""
    folder = os.path.join(corpus, "sentences")
    os.makedirs(folder, exist_ok=True)
    for f in range(files):
        part = texts[f::files]
        table = pa.table({"sentence_id": [f"s{f}-{i}" for i in range(len(part))], "text": part},
                         schema=schemas.SENTENCES)
        pq.write_table(table, os.path.join(folder, f"sentences-{f:05d}-of-{files:05d}.parquet"))
    return folder


def test_each_position_takes_its_modalitys_expert_in_each_layer():
    model = small_model(layers=4, vl_layers=2).eval()
    used = []
    for index, layer in enumerate(model.layers):
        assert (layer.vl_ffn is not None) == (index >= 2)  # VL-FFN only in the top F = 2 layers
        for name in (V, L, VL):
            expert = getattr(layer, name)
            if expert is not None:
                expert.register_forward_hook(lambda m, args, out, i=index, n=name: used.append((i, n, args[0].shape[1])))
    ids, text_mask = torch.randint(5, 100, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    features, locations, region_mask = torch.randn(2, 3, 6), torch.rand(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)

    model.encode_image(features, locations, region_mask)  # [I_CLS] + 3 regions
    assert used == [(i, V, 4) for i in range(4)]
    used.clear()
    model.encode_text(ids, text_mask)
    assert used == [(i, L, 5) for i in range(4)]
    used.clear()
    text, regions = model(ids, text_mask, features, locations, region_mask)  # [5 text] + [I_CLS + 3 regions]
    assert used == [(0, L, 5), (0, V, 4), (1, L, 5), (1, V, 4), (2, VL, 9), (3, VL, 9)]
    assert text.shape == (2, 5, 32) and regions.shape == (2, 3, 32)  # [I_CLS] is not a region


def test_attention_and_every_expert_start_from_the_init_berts_layer():
    from schemas.corpus import bundled_minilm_path
    from vlp_train.backbone import read_weights
    from vlp_train.config import ModelConfig
    from vlp_train.backbone import bert_config
    folder = bundled_minilm_path()
    model = VLMoModel(bert_config(ModelConfig(), folder), feature_dim=6, tags=["cat"], vl_layers=2)
    load_bert_weights(model, folder)
    weights = read_weights(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
    last = len(model.layers) - 1
    for expert in (V, L, VL):
        torch.testing.assert_close(getattr(model.layers[last], expert).intermediate.dense.weight,
                                   weights[f"{prefix}encoder.layer.{last}.intermediate.dense.weight"])
        torch.testing.assert_close(getattr(model.layers[0], expert if expert != VL else L).output.LayerNorm.weight,
                                   weights[f"{prefix}encoder.layer.0.output.LayerNorm.weight"])
    torch.testing.assert_close(model.layers[2].attention.self.query.weight,
                               weights[f"{prefix}encoder.layer.2.attention.self.query.weight"])
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, weights[f"{prefix}embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("stage,trained,frozen", [
    ("vision", ["layers.0.attention.self.query.weight", "layers.1.v_ffn.intermediate.dense.weight",
                "region.feature.weight", "image_cls", "mrfr.1.weight"],
     ["layers.0.l_ffn.intermediate.dense.weight", "layers.1.vl_ffn.output.dense.weight",
      "embeddings.word_embeddings.weight", "mlm_bias", "itm.0.weight", "text_proj.weight", "logit_scale",
      "embeddings.token_type_embeddings.weight"]),  # used by the regions, shared with text: frozen
    ("language", ["layers.0.l_ffn.intermediate.dense.weight", "embeddings.word_embeddings.weight", "mlm_bias",
                  "mlm_transform.dense.weight"],
     ["layers.0.attention.self.query.weight", "layers.1.v_ffn.intermediate.dense.weight",
      "layers.1.vl_ffn.output.dense.weight", "region.feature.weight", "image_cls", "itm.0.weight", "logit_scale",
      "embeddings.token_type_embeddings.weight"]),
])
def test_a_stage_trains_its_parameters_and_leaves_the_rest_as_they_were(tmp_path, stage, trained, frozen):
    corpus = str(tmp_path / "c")
    shards = write_shards(corpus, n_images=32, per_shard=16)
    write_sentences(corpus, [f"a sentence number {i} about a cat." for i in range(40)])
    cfg = load_config("vlmo-debug", VLMO + [f"model.stage={stage}", "optim.lr=1e-2", "optim.warmup_ratio=0"])
    cfg.data.shards, cfg.run.output = shards, str(tmp_path / "run")
    run = build_run(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    for batch in run.dataset:
        views = to_device(batch["views"], run.device)
        assert list(views) == [Task.IMAGE_ONLY if stage == "vision" else Task.TEXT_ONLY]
        loss, _, _ = compute_loss(run.step_module, views, False, run.autocast)
        loss.backward()
        optimizer_step(run, loss)
        break
    after = dict(run.model.named_parameters())
    for name in trained:
        assert not torch.equal(before[name], after[name]), f"{stage}: {name} did not train"
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for name in frozen:
        assert name not in changed, f"{stage}: {name} is frozen but changed"
    allowed = set(run.model.stage_parameters(stage))
    assert changed <= allowed


def test_the_text_stream_deals_every_row_once_over_ranks_and_workers(tmp_path):
    from vlp_train.masking import BatchBuilder
    from vlp_train.text_corpus import TextStream, rows_per_file, text_corpus_files
    from transformers import BertTokenizerFast
    from schemas.corpus import bundled_minilm_path
    corpus = str(tmp_path / "c")
    shards = write_shards(corpus, n_images=4, per_shard=4)
    texts = [f"sentence {i}" for i in range(23)] + [" "]  # the blank one is a bad sample
    write_sentences(corpus, texts, files=2)
    files = text_corpus_files(None, [shards.replace("*.tar", "corpus-000000.tar")])
    counts = rows_per_file(files)
    assert sum(counts.values()) == 24
    cfg = load_config("vlmo-debug", ["model.stage=language"])
    builder = BatchBuilder(BertTokenizerFast.from_pretrained(bundled_minilm_path()), {}, 16, 4, cfg.objectives)
    seen, bad, per_rank = [], 0, []
    for rank in range(2):
        stream = TextStream(files, builder, 5, [Task.TEXT_ONLY], "round_robin", 8, seed=1, rank=rank, world=2)
        assert stream.epoch_batches(0, counts, workers=2) == 4  # 6 rows a (rank, worker): batches of 5 and 1
        per_rank.append(0)
        for worker in range(2):
            with mock.patch("vlp_train.data.get_worker_info", return_value=mock.Mock(num_workers=2, id=worker)):
                for batch in stream:
                    seen += batch["keys"]
                    bad += batch["bad_samples"]
                    per_rank[-1] += 1
                    assert list(batch["views"]) == [Task.TEXT_ONLY]
    assert len(seen) == 23 and len(set(seen)) == 23 and bad == 1  # every good row once, the blank one counted
    assert per_rank == [4, 4]


@pytest.mark.slow
def test_a_killed_and_resumed_vlmo_run_matches_an_uninterrupted_one(tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=32, per_shard=16)
    common = VLMO + ["optim.max_steps=4", "optim.epochs=4", "data.batch_size=8"]

    def config(out, *more):
        cfg = load_config("vlmo-debug", common + list(more))
        cfg.data.shards, cfg.run.output = shards, str(tmp_path / out)
        return cfg
    train(config("whole"))
    assert train(config("broken", "run.save_every=2", "run.stop_after=3"))["stopped"]
    resumed = load_config("vlmo-debug")
    resumed.run.output = str(tmp_path / "broken")
    summary = train(resumed, resume=True)
    assert summary["steps"] == 4

    def losses(out):
        with open(os.path.join(tmp_path, out, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return {r["step"]: (r["loss"], r["vl/itc"], r["vl/itm"], r["vl/mlm"]) for r in rows if "loss" in r}
    whole, broken = losses("whole"), losses("broken")
    assert sorted(broken) == list(range(1, 5))
    for step in range(1, 5):
        assert broken[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), step
    evaluation = summary["eval"]
    for key in ("i2t_r1", "t2i_r10", "i2t_itm_r5", "dual_s_per_1k_queries", "itm_rerank_s_per_1k_queries"):
        assert key in evaluation


@pytest.mark.slow
def test_the_three_stages_run_one_after_another_each_from_the_last(tmp_path):
    corpus = str(tmp_path / "c")
    shards = write_shards(corpus, n_images=32, per_shard=16)
    rng = random.Random(0)
    write_sentences(corpus, [f"a {rng.choice(['cat', 'dog', 'cup'])} on a {rng.choice(['sofa', 'car'])}."
                             for _ in range(40)])
    out = str(tmp_path / "run")
    args = ["run", "--config", "vlmo-debug", "--shards", shards, "--output", out, "--stage", "vision,language,vl"]
    for item in VLMO + ["optim.max_steps=2"]:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "BertModel" not in result.output  # a VLMo's weights are not a BertModel's
    models = {}
    for stage in ("vision", "language", "vl"):
        with open(os.path.join(out, stage, "config.json")) as f:
            saved = json.load(f)
        assert saved["model"]["stage"] == stage
        models[stage] = VLMoModel.from_pretrained(os.path.join(out, stage))
    # the language stage started from the vision stage's model and left its vision side alone;
    # the vl stage started from the language stage's
    vision, language = models["vision"].state_dict(), models["language"].state_dict()
    torch.testing.assert_close(language["layers.0.v_ffn.intermediate.dense.weight"],
                               vision["layers.0.v_ffn.intermediate.dense.weight"])
    torch.testing.assert_close(language["layers.0.attention.self.query.weight"],
                               vision["layers.0.attention.self.query.weight"])
    assert not torch.equal(language["layers.0.l_ffn.intermediate.dense.weight"],
                           vision["layers.0.l_ffn.intermediate.dense.weight"])
    with open(os.path.join(out, "vl", "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {"vl/itc", "vl/itm", "vl/mlm"} <= set(next(r for r in rows if "loss" in r))


def _vl_view(rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, 6), generator=g)
    labels = torch.full((rows, 2), -100)
    labels[:, 0] = ids[:, 1]
    return {"input_ids": ids, "clean_ids": ids, "text_mask": torch.ones(rows, 6, dtype=torch.bool),
            "mlm_positions": torch.ones(rows, 2, dtype=torch.long), "mlm_targets": labels,
            "features": torch.randn(rows, 3 + seed % 2, 6, generator=g), "locations": torch.rand(rows, 3 + seed % 2, 5),
            "region_mask": torch.ones(rows, 3 + seed % 2, dtype=torch.bool), "text_keys": torch.arange(rows) + 10 * seed,
            # rank 0's images also retrieved rank 1's first sentence (key 10): sets of 2 and of 1 across ranks
            "retrieved_keys": torch.stack([torch.arange(rows) + 10 * seed] + ([torch.full((rows,), 10)] if seed == 0 else []), 1),
            "active": torch.ones(rows, dtype=torch.bool)}


def _ddp_vl_rank(rank: int, port: int, results):
    import torch.distributed as dist
    from vlp_train.families import family_of
    from vlp_train.step import Pretraining
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = small_model(layers=2, vl_layers=1)
        step = torch.nn.parallel.DistributedDataParallel(Pretraining(model, family_of("vlmo")),
                                                         find_unused_parameters=True)
        torch.manual_seed(rank)  # each rank its own hard-negative draws
        # ranks of different batch sizes and region counts: negatives come from either
        results_view = _vl_view(3 if rank == 0 else 2, seed=rank)
        named, _, _ = step({Task.IMAGE_TEXT: results_view})[Task.IMAGE_TEXT]
        sum(v.mean() for v in named.values()).backward()
        results[rank] = ({k: v.detach() for k, v in named.items()}, model.layers[0].v_ffn.output.dense.weight.grad.clone())
    finally:
        dist.destroy_process_group()


def test_the_vl_step_under_ddp_draws_negatives_across_ranks_and_agrees_on_gradients():
    from .test_distributed import _run_ranks
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        _run_ranks(_ddp_vl_rank, results, timeout=90)
        results = dict(results)
    assert results[0][0]["itc"].shape == (3,) and results[1][0]["itc"].shape == (2,)
    assert all(torch.isfinite(v).all() for r in results.values() for v in r[0].values())
    torch.testing.assert_close(results[0][1], results[1][1])  # DDP's averaged gradient, the same on both


def test_vlmo_and_mu_vla_train_together_with_the_curriculum_weighting_both(tmp_path):
    from vlp_train.curriculum import weighted_tasks
    shards = write_shards(str(tmp_path / "c"), n_images=32, per_shard=16)
    cfg = load_config("vlmo-debug", VLMO + ["objectives.region_tag=true", "objectives.region_phrase=true",
                                            "objectives.image_sentence=true", "objectives.schedule=mixed",
                                            "objectives.itm_weighting=true", "objectives.weight_image_text=true",
                                            "objectives.itm_weight_from_epoch=1"])
    cfg.data.shards, cfg.run.output = shards, str(tmp_path / "run")
    run = build_run(cfg)
    assert weighted_tasks(0, cfg.objectives) == ()
    assert set(weighted_tasks(1, cfg.objectives)) == {Task.REGION_PHRASE, Task.IMAGE_SENTENCE, Task.IMAGE_TEXT}
    cfg.objectives.weight_image_text = False
    assert Task.IMAGE_TEXT not in weighted_tasks(1, cfg.objectives)
    batch = next(iter(run.dataset))
    views = to_device(batch["views"], run.device)
    loss, named, weights = compute_loss(run.step_module, views, (Task.IMAGE_SENTENCE, Task.IMAGE_TEXT), run.autocast)
    assert torch.isfinite(loss)
    assert {"rt/mrc", "rp/mrtc", "is/itm", "vl/itc", "vl/itm", "vl/mlm"} <= set(named)
    assert set(weights) == {Task.IMAGE_SENTENCE, Task.IMAGE_TEXT}
    assert ((weights[Task.IMAGE_TEXT] > 0) & (weights[Task.IMAGE_TEXT] < 1)).all()


@pytest.mark.parametrize("visual,image_tokens", [("patches", 1 + 4), ("both", 1 + 3 + 4)])
def test_patches_take_the_vision_expert_as_regions_do(visual, image_tokens):
    model = small_model(layers=3, vl_layers=1, visual=visual, image_size=32, patch_size=16).eval()  # 2 x 2 patches
    used = []
    for index, layer in enumerate(model.layers):
        for name in (V, L, VL):
            if getattr(layer, name) is not None:
                getattr(layer, name).register_forward_hook(
                    lambda m, args, out, i=index, n=name: used.append((i, n, args[0].shape[1])))
    ids, text_mask = torch.randint(5, 100, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    features, region_mask = torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool)
    locations = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0, 0.25], [0.0, 0.0, 1.0, 1.0, 1.0]]).expand(2, 3, 5)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    image = model.encode_image(features, locations, region_mask, pixels)
    assert image.shape[1] == image_tokens and used == [(i, V, image_tokens) for i in range(3)]
    used.clear()
    text, regions, patches = model.encode(ids, text_mask, features, locations, region_mask, pixels)
    assert used == [(0, L, 5), (0, V, image_tokens), (1, L, 5), (1, V, image_tokens), (2, VL, 5 + image_tokens)]
    assert regions.shape == (2, 3, 32) and patches.shape == (2, 1 + 4, 32)
    # a region on patches is the mean of its patches' states: the first box covers the top-left patch only
    if visual == "patches":
        torch.testing.assert_close(regions[:, 0], patches[:, 1])
        torch.testing.assert_close(regions[:, 2], patches[:, 1:].mean(1))


def test_the_vit_gives_the_patch_embedding_and_each_layers_vision_expert(tmp_path):
    from vlp_train.families.vlmo import load_vit_weights
    from vlp_train.visual import read_vit
    from .test_visual import hf_vit
    hf_vit(str(tmp_path / "vit"), image_size=32, patch=8, hidden=32, layers=2)
    weights, info = read_vit(str(tmp_path / "vit"))
    model = small_model(layers=2, vl_layers=1, visual="patches", image_size=32, patch_size=8).eval()
    before_l = model.layers[1].l_ffn.intermediate.dense.weight.clone()
    load_vit_weights(model, weights, info, "vit")
    torch.testing.assert_close(model.patches.cls_token, weights["cls_token"])
    x = F.layer_norm(torch.randn(4, 32), (32,))  # what the FFN sees in both: a normalised input
    for i, layer in enumerate(model.layers):
        normed = x * weights[f"blocks.{i}.norm2.weight"] + weights[f"blocks.{i}.norm2.bias"]
        vit_mlp = F.linear(F.gelu(F.linear(normed, weights[f"blocks.{i}.mlp.fc1.weight"], weights[f"blocks.{i}.mlp.fc1.bias"])),
                           weights[f"blocks.{i}.mlp.fc2.weight"], weights[f"blocks.{i}.mlp.fc2.bias"])
        ours = layer.v_ffn.output.dense(F.gelu(layer.v_ffn.intermediate.dense(x)))
        torch.testing.assert_close(ours, vit_mlp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.layers[1].l_ffn.intermediate.dense.weight, before_l)  # the language side untouched


def test_vlmo_on_patches_trains_the_vl_and_vision_stages(tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=32, per_shard=16, images=96)
    for stage, task in (("vl", Task.IMAGE_TEXT), ("vision", Task.IMAGE_ONLY)):
        cfg = load_config("vlmo-debug", TINY_PATCHES + VLMO[len(TINY_MODEL):] + [
            "model.visual=patches", f"model.stage={stage}", "optim.lr=1e-2", "optim.warmup_ratio=0"])
        cfg.data.shards, cfg.run.output = shards, str(tmp_path / stage)
        run = build_run(cfg)
        batch = next(iter(run.dataset))
        views = to_device(batch["views"], run.device)
        assert list(views) == [task] and views[task]["pixels"].shape[1:] == (64, 64, 3)
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        loss, named, _ = compute_loss(run.step_module, views, False, run.autocast)
        assert torch.isfinite(loss) and all(torch.isfinite(v[0]) for v in named.values())
        loss.backward()
        optimizer_step(run, loss)
        after = dict(run.model.named_parameters())
        assert not torch.equal(before["patches.patch_embed.proj.weight"], after["patches.patch_embed.proj.weight"])
        frozen_in_vision = "layers.0.l_ffn.intermediate.dense.weight"
        assert torch.equal(before[frozen_in_vision], after[frozen_in_vision]) == (stage == "vision")
        from vlp_train.train import evaluate_run
        evaluation = evaluate_run(run)  # retrieval and re-ranking over the held-out pairs' pixels
        assert 0 <= evaluation["i2t_itm_r1"] <= 1 and evaluation["pairs"] > 0
        assert ("region_regression_mse" in evaluation) == (stage == "vision")


def test_the_text_stream_resumed_at_a_batch_gives_the_rest_of_the_epoch_as_it_was(tmp_path):
    from schemas.corpus import bundled_minilm_path
    from transformers import BertTokenizerFast
    from vlp_train.masking import BatchBuilder
    from vlp_train.text_corpus import TextStream, text_corpus_files
    corpus = str(tmp_path / "c")
    write_sentences(corpus, [f"sentence number {i} is here" for i in range(37)], files=2)
    files = text_corpus_files(os.path.join(corpus, "sentences"), [])
    cfg = load_config("vlmo-debug", ["model.stage=language"])
    builder = BatchBuilder(BertTokenizerFast.from_pretrained(bundled_minilm_path()), {}, 16, 4, cfg.objectives)
    stream = TextStream(files, builder, 4, [Task.TEXT_ONLY], "round_robin", 16, seed=3)
    stream.set_position(1)
    whole = [(b["index"], b["keys"], b["views"][Task.TEXT_ONLY]["input_ids"]) for b in stream]
    assert sorted(k for _, keys, _ in whole for k in keys) == sorted(f"s{f}-{i}" for f in (0, 1) for i in range(19 - f))
    stream.set_position(1, start_batch=3)
    resumed = [(b["index"], b["keys"], b["views"][Task.TEXT_ONLY]["input_ids"]) for b in stream]
    assert [(i, k) for i, k, _ in resumed] == [(i, k) for i, k, _ in whole[3:]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(resumed, whole[3:]))  # the same masks too
    stream.set_position(2)
    assert [k for _, k, _ in whole] != [b["keys"] for b in stream]  # another epoch, another order


def test_the_image_text_switch_is_read_under_its_former_vlmo_name_with_a_warning(caplog):
    """objectives.vlmo switched VLMAE's pair task as well as VLMo's: it is objectives.image_text now
    (weight_vlmo: weight_image_text). The old names still work, from --set and from a saved config
    (a run's config.json, a checkpoint's), each with a warning naming the new key."""
    from vlp_train.config import TrainConfig
    from vlp_train.data import enabled_tasks

    assert load_config("vlmo-debug").objectives.image_text and load_config("vlmae-debug").objectives.image_text
    with caplog.at_level("WARNING"):
        cfg = load_config("debug", ["objectives.vlmo=true", "objectives.weight_vlmo=true"])
    assert cfg.objectives.image_text and cfg.objectives.weight_image_text
    assert Task.IMAGE_TEXT in enabled_tasks(cfg.objectives)
    assert "objectives.vlmo is renamed objectives.image_text" in caplog.text
    assert "objectives.weight_vlmo is renamed objectives.weight_image_text" in caplog.text
    saved = load_config("vlmae-debug").to_dict()
    del saved["objectives"]["image_text"]
    saved["objectives"]["vlmo"] = False  # an old run that switched the pair task off
    restored = TrainConfig.from_dict(saved)
    assert restored.objectives.image_text is False and not hasattr(restored.objectives, "vlmo")
    with pytest.raises(ValueError, match="unknown key"):
        load_config("debug", ["objectives.pair_task=true"])
