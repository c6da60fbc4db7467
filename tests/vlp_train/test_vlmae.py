"""VLMAE (model.arch=vlmae): the encoder sees only the visible elements, RMIM covers exactly the
hidden elements inside the linked boxes, the momentum encoders are an EMA without gradient, ITC
distillation at alpha 0 is plain ITC, exact resume carries the momentum encoders, short real runs."""
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertTokenizerFast

from schemas.corpus import bundled_minilm_path
from vlp_train.config import ObjectiveConfig, load_config
from vlp_train.families.vlmae import (PAIR_TASK, VLMAEModel, pair_losses, pair_view, rmim_losses,
                                      visible_elements)
from vlp_train.masking import BatchBuilder
from vlp_train.objectives.contrastive import itc_losses
from vlp_train.train import train

from .conftest import DIM, TAGS, TINY_MODEL, write_shards

VLMAE_TINY = TINY_MODEL + ["model.vision_layers=2", "model.vision_hidden=32", "model.vision_heads=2",
                           "model.decoder_layers=1", "model.decoder_hidden=32", "model.decoder_heads=2"]


@pytest.fixture(scope="module")
def builder():
    tokenizer = BertTokenizerFast.from_pretrained(bundled_minilm_path())
    return BatchBuilder(tokenizer, {t: i for i, t in enumerate(sorted(TAGS))}, 40, 36, ObjectiveConfig())


def tiny_model(regions_dim=DIM, fusion_layers=1, patches: bool = False) -> VLMAEModel:
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    pixels = {"visual": "patches", "image_size": 32, "patch_size": 8, "pixel_mean": [0.5] * 3,
              "pixel_std": [0.25] * 3} if patches else {}
    return VLMAEModel(config, {"feature_dim": regions_dim, "tags": sorted(TAGS), "fusion_layers": fusion_layers,
                               "vision": [2, 32, 2], "decoder": [1, 16, 2], **pixels})


def grid_sample(i: int, links: list[tuple[int, float]], n: int = 8) -> dict:
    """An image 400 x 100 with `n` regions side by side (region r: x from 50r to 50r + 50) plus one
    big region 8 (x 0-200, all the height); one sentence whose phrases link to `links`
    (region, similarity)."""
    boxes = [[50.0 * r, 0.0, 50.0 * r + 50, 100.0] for r in range(n)] + [[0.0, 0.0, 200.0, 100.0]]
    text = " and ".join(f"a thing{k}" for k in range(len(links))) or "nothing here."
    phrases, start = [], 0
    for k, (region, similarity) in enumerate(links):
        phrase = f"a thing{k}"
        start = text.index(phrase, start)
        phrases.append({"text": phrase, "start": start, "end": start + len(phrase), "words": [f"thing{k}"],
                        "region": region, "tag": "cat", "similarity": similarity})
    meta = {"schema_version": 1, "image_id": f"g{i}", "width": 400, "height": 100, "boxes": boxes,
            "tags": ["cat"] * len(boxes), "scores": [0.9] * len(boxes),
            "sentences": [{"sentence_id": f"s{i}", "text": text, "rank": 0, "score": 0.9, "phrases": phrases}]}
    feats = np.random.default_rng(i).standard_normal((len(boxes), DIM)).astype(np.float16)
    return {"key": f"g{i}", "meta": meta, "feats": feats}


def view_of(builder, samples, seed=0, mask_ratio=0.5, grid=0):
    """The pair view; with `grid`, of 32 x 32 images in grid x grid patches (random pixels)."""
    rng = random.Random(seed)
    sentences = [s["meta"]["sentences"][0] for s in samples]
    view = pair_view(builder, samples, sentences, rng, mask_ratio=mask_ratio, grid=grid)
    if grid:
        view["pixels"] = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (len(samples), 32, 32, 3),
                                                                                 dtype=np.uint8))
    return {k: (v.float() if torch.is_tensor(v) and v.dtype == torch.float16 else v) for k, v in view.items()}


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_the_image_encoder_sees_only_the_visible_elements(builder, ratio):
    """Every image has N = 9 regions: the encoder's sequence is int(N (1 - ratio)) + 1 ([I_CLS])
    long, in every block, and holds exactly the visible regions' embeddings."""
    samples = [grid_sample(i, [(1, 0.9)]) for i in range(4)]
    view = view_of(builder, samples, mask_ratio=ratio)
    n, kept = 9, int(9 * (1 - ratio))
    assert view["visible"].shape == (4, kept) and bool(view["visible_mask"].all())
    assert view["hidden"].sum(1).tolist() == [n - kept] * 4
    model = tiny_model()
    lengths = []
    for block in model.vision.blocks:
        block.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    tokens = []
    model.vision.blocks[0].register_forward_pre_hook(lambda module, args: tokens.append(args[0][:, 1:].detach()))
    states, mask = model.encode_image(view, visible=True)
    assert states.shape[1] == kept + 1 and lengths == [kept + 1] * len(model.vision.blocks)
    everything = model.vision.tokens(view)
    for i in range(4):
        torch.testing.assert_close(tokens[0][i], everything[i, view["visible"][i]])
        # each visible element is one the view does not hide, and the hidden ones are the rest
        assert not view["hidden"][i, view["visible"][i]].any()


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_on_patches_the_image_encoder_sees_only_the_visible_patches(builder, ratio):
    """32 x 32 images in 8 px patches: N = 16; the encoder's sequence is (1 - ratio) N + 1."""
    samples = [grid_sample(i, [(1, 0.9)]) for i in range(3)]
    view = view_of(builder, samples, mask_ratio=ratio, grid=4)
    kept = int(16 * (1 - ratio))
    model = tiny_model(patches=True)
    lengths = []
    for block in model.vision.blocks:
        block.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    states, _ = model.encode_image(view, visible=True)
    assert states.shape[1] == kept + 1 and lengths == [kept + 1] * len(model.vision.blocks)
    assert view["hidden"].shape == (3, 16) and view["hidden"].sum(1).tolist() == [16 - kept] * 3
    losses, _ = pair_losses(model.train(), view)
    assert all(bool(torch.isfinite(v).all()) for v in losses.values())
    assert (losses["rmim"] > 0).all() == (ratio > 0)


def test_on_patches_rmim_covers_the_hidden_patches_whose_centre_is_in_a_linked_box(builder):
    """A 400 x 100 image in 4 x 4 patches (each 100 x 25 of it; centres at x 50, 150, 250, 350):
    the link to region 1 (x 50-100) holds column 0, the one to region 8 (x 0-200) columns 0 and 1.
    RMIM's weights are 1 exactly on the hidden patches of columns 0-1, and its target is the hidden
    patches' pixels."""
    samples = [grid_sample(0, [(1, 0.9), (8, 0.6)])]
    view = view_of(builder, samples, seed=5, grid=4)
    inside = torch.tensor([c in (0, 1) for r in range(4) for c in range(4)])
    torch.testing.assert_close(view["rmim_weight"][0], (view["hidden"][0] & inside).float())
    assert 0 < view["rmim_weight"].sum() < view["hidden"].sum()
    model = tiny_model(patches=True)
    targets = model.vision.tokens.targets(view)
    assert targets.shape == (1, 16, 8 * 8 * 3)
    # patch (row 1, column 2) is pixels [8:16, 16:24], normalised by the model's mean and std
    expected = (view["pixels"][0, 8:16, 16:24].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(targets[0, 1 * 4 + 2], expected.reshape(-1))


def test_visible_elements_draws_per_sample_and_keeps_at_least_one():
    visible, mask = visible_elements([4, 1, 0, 8], 0.75, random.Random(1))
    assert mask.sum(1).tolist() == [1, 1, 0, 2]
    assert len({tuple(v[m]) for v, m in zip(visible, mask)}) >= 2


def test_rmim_covers_exactly_the_hidden_elements_inside_the_linked_boxes(builder):
    """Region 1 (x 50-100) and region 8 (x 0-200) are linked: their union holds the centres of
    regions 0-3 and 8, not 4-7. RMIM's weights are 1 exactly on those of them that are hidden; a
    prediction elsewhere changes nothing; with no linked phrase, every hidden region counts."""
    samples = [grid_sample(0, [(1, 0.9), (8, 0.6)]), grid_sample(1, [])]
    view = view_of(builder, samples, seed=3)
    inside = torch.zeros(9, dtype=torch.bool)
    inside[[0, 1, 2, 3, 8]] = True
    torch.testing.assert_close(view["rmim_weight"][0], (view["hidden"][0] & inside).float())
    torch.testing.assert_close(view["rmim_weight"][1], view["hidden"][1].float())
    assert 0 < view["rmim_weight"][0].sum() < view["hidden"][0].sum()  # the draw hides some of each kind
    predictions = torch.randn(2, 9, DIM, requires_grad=True)
    loss = rmim_losses(predictions, view["features"], view["rmim_weight"], norm=True)
    target = view["features"][0]
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    covered = view["rmim_weight"][0].bool()
    expected = (predictions[0, covered] - target[covered]).pow(2).mean()
    torch.testing.assert_close(loss[0], expected)
    loss.sum().backward()
    assert (predictions.grad[0].abs().sum(-1) > 0).tolist() == covered.tolist()

    weighted = BatchBuilder(builder.tok, builder.tag_index, 40, 36, ObjectiveConfig(rmim_link_weight=True))
    view = view_of(weighted, samples[:1], seed=3)
    # the highest similarity of the boxes holding the centre: region 8's centre (x 100) is on
    # region 1's edge, and edges count
    by_link = torch.tensor([0.9 if r in (1, 8) else 0.6 if r in (0, 2, 3) else 0.0 for r in range(9)])
    torch.testing.assert_close(view["rmim_weight"][0], by_link * view["hidden"][0])


def test_momentum_encoders_are_an_ema_and_take_no_gradient(builder):
    model = tiny_model()
    samples = [grid_sample(i, [(i % 8, 0.9)]) for i in range(4)]
    view = view_of(builder, samples)
    online, momentum = model._momentum_pairs()
    assert len(online) == len(momentum) and all(not p.requires_grad for p in momentum)
    for o, m in zip(online, momentum):
        torch.testing.assert_close(o, m)  # they start as copies
    before = [m.clone() for m in momentum]
    with torch.no_grad():  # move the online weights, as an optimizer step would
        for o in online:
            o.add_(torch.randn_like(o))
    model.train()
    losses, _ = pair_losses(model, {**view, "momentum": 0.9})  # the training forward updates them first
    sum(v.mean() for v in losses.values()).backward()
    for o, m, b in zip(online, momentum, before):
        assert m.grad is None
        torch.testing.assert_close(m, 0.9 * b + 0.1 * o.detach())
    assert all(o.grad is not None for o in model.vision.blocks.parameters())
    # no update outside training
    model.eval()
    snapshot = [m.clone() for m in momentum]
    pair_losses(model, view)
    for m, s in zip(momentum, snapshot):
        torch.testing.assert_close(m, s)


def test_itc_with_distillation_at_alpha_zero_is_plain_itc(builder):
    model = tiny_model().eval()
    samples = [grid_sample(i, [(i % 8, 0.9)]) for i in range(6)]
    view = view_of(builder, samples)
    image, _ = model.encode_image(view, visible=True)
    text = model.encode_text(view["clean_ids"], view["text_mask"])
    image_feat = F.normalize(model.vision_proj(image[:, 0]).float(), dim=-1)
    text_feat = F.normalize(model.text_proj(text[:, 0]).float(), dim=-1)
    plain = itc_losses(image_feat, text_feat, model.itc_log_scale, view["text_keys"]).losses
    torch.manual_seed(0)
    at_zero = pair_losses(model, {**view, "distill_alpha": 0.0})[0]["itc"]
    torch.testing.assert_close(at_zero, plain)
    distilled = pair_losses(model, {**view, "distill_alpha": 0.4})[0]["itc"]
    assert not torch.allclose(distilled, plain)


def test_a_sentence_an_image_retrieved_is_never_its_itc_negative(builder):
    """Image 0 retrieved image 1's sentence too (one of its K): VLMAE's ITC counts it as image 0's
    positive, as VLMo's does, not as a negative."""
    model = tiny_model().eval()
    samples = [grid_sample(i, [(k, 0.9) for k in range(i + 1)]) for i in range(4)]  # four different texts
    samples[0]["meta"]["sentences"].append({**samples[1]["meta"]["sentences"][0], "rank": 1})
    view = view_of(builder, samples)
    image, _ = model.encode_image(view, visible=True)
    text = model.encode_text(view["clean_ids"], view["text_mask"])
    image_feat = F.normalize(model.vision_proj(image[:, 0]).float(), dim=-1)
    text_feat = F.normalize(model.text_proj(text[:, 0]).float(), dim=-1)
    own = itc_losses(image_feat, text_feat, model.itc_log_scale, view["text_keys"],
                     image_keys=view["retrieved_keys"]).losses
    plain = itc_losses(image_feat, text_feat, model.itc_log_scale, view["text_keys"]).losses
    torch.manual_seed(0)
    got = pair_losses(model, {**view, "distill_alpha": 0.0})[0]["itc"]
    torch.testing.assert_close(got, own)
    assert not torch.allclose(got[:2], plain[:2])  # images 0 and 1 (text 1 is image 0's too) change


def rows(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def config(shards, out, *overrides):
    cfg = load_config("vlmae-debug", VLMAE_TINY + ["run.log_every=1", *overrides])
    cfg.data.shards, cfg.run.output = shards, str(out)
    return cfg


@pytest.mark.slow
def test_held_out_in_batch_recall_ranks_fp32_similarities_under_autocast(builder, monkeypatch):
    """The evaluation's ITC similarity is computed outside autocast: in bf16 (CUDA's autocast, here
    CPU's) near scores tie, and a tie counts against the right answer."""
    from types import SimpleNamespace

    import vlp_train.evaluate
    from vlp_train.families.vlmae import _evaluate

    ranked = []
    real_recall_at = vlp_train.evaluate.recall_at

    def recall_at(scores, positive, ks):
        ranked.append(scores.dtype)
        return real_recall_at(scores, positive, ks)
    monkeypatch.setattr(vlp_train.evaluate, "recall_at", recall_at)
    view = view_of(builder, [grid_sample(i, [(i % 8, 0.9)]) for i in range(4)])
    cfg = SimpleNamespace(run=SimpleNamespace(eval_batches=1))
    result = _evaluate(tiny_model(), [{"views": {PAIR_TASK: view}}], cfg, torch.device("cpu"),
                       torch.autocast("cpu", dtype=torch.bfloat16))
    assert ranked == [torch.float32, torch.float32] and 0 <= result["itc_i2t_r1"] <= 1


def test_killed_and_resumed_vlmae_run_matches_an_uninterrupted_one(tmp_path):
    """The momentum encoders are in the checkpoint: a resumed run's losses (whose IFR and ITC
    targets come from them) equal the uninterrupted run's, and they end equal."""
    shards = write_shards(str(tmp_path / "c"), n_images=48, per_shard=16)
    common = ["optim.max_steps=6", "optim.epochs=4", "data.batch_size=8", "run.eval_batches=1"]
    whole = config(shards, tmp_path / "whole", *common)
    train(whole)
    broken = config(shards, tmp_path / "broken", *common, "run.save_every=3", "run.stop_after=4")
    assert train(broken)["stopped"]
    saved = torch.load(os.path.join(broken.run.output, "checkpoints", "step-00000003.pt"), weights_only=True)
    momentum = [k for k in saved["model"] if k.startswith("momentum_")]
    assert momentum and any(not torch.equal(saved["model"][k], saved["model"][k.replace("momentum_", "", 1)])
                            for k in momentum if k.replace("momentum_", "", 1) in saved["model"])
    resumed = load_config("debug")
    resumed.run.output = broken.run.output
    assert train(resumed, resume=True)["steps"] == 6
    whole_losses = {r["step"]: r for r in rows(whole.run.output) if "loss" in r}
    broken_losses = {r["step"]: r for r in rows(broken.run.output) if "loss" in r}
    assert sorted(broken_losses) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "vl/ifr", "vl/itc", "vl/rmim"):
            assert broken_losses[step][key] == pytest.approx(whole_losses[step][key], rel=1e-5, abs=1e-6), (step, key)
    a = torch.load(os.path.join(whole.run.output, "checkpoints", "step-00000006.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(broken.run.output, "checkpoints", "step-00000006.pt"), weights_only=True)["model"]
    for key in momentum:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_region_feature_vlmae_learns_on_a_corpus_without_images(tmp_path):
    """The region-feature variant on shards of region features only: the losses fall, the μ-VLA
    granularities run on its fusion learner beside the pair objectives (all weighted by its ITM
    from epoch 1), and the exported model reloads whole: the momentum encoders, which the export
    leaves out (fine-tuning never reads them; the checkpoint keeps them), start as the online ones."""
    from vlp_train.pretrained import load

    shards = write_shards(str(tmp_path / "c"), n_images=40, per_shard=20)
    cfg = config(shards, tmp_path / "run", "data.batch_size=10", "optim.max_steps=20", "optim.epochs=20",
                 "optim.lr=2e-3", "run.eval_batches=2", "objectives.schedule=mixed", "objectives.region_tag=true",
                 "objectives.region_phrase=true", "objectives.image_sentence=true", "objectives.itm_weighting=true",
                 "objectives.weight_image_text=true")
    summary = train(cfg)
    logged = [r for r in rows(cfg.run.output) if "loss" in r]
    assert {"vl/rmim", "vl/ifr", "vl/itc", "vl/itm", "vl/mlm", "rt/mlm", "rt/mrc", "rp/mrtc", "is/itm"} <= set(logged[0])
    assert any(r["itm_weighting"] for r in logged)
    for key in ("vl/rmim", "vl/itc", "vl/mlm"):
        assert np.mean([r[key] for r in logged[-5:]]) < np.mean([r[key] for r in logged[:5]]), key
    assert set(summary["eval"]) >= {"itc_i2t_r1", "itm_auc", "rmim", "sentence_mlm_acc"}
    model = load(os.path.join(cfg.run.output, "hf"))
    state = torch.load(sorted(os.path.join(cfg.run.output, "checkpoints", f)
                              for f in os.listdir(os.path.join(cfg.run.output, "checkpoints")))[-1],
                       weights_only=True)["model"]
    for key, value in model.state_dict().items():
        if not key.startswith("momentum_"):
            torch.testing.assert_close(value, state[key])
    online, momentum = model._momentum_pairs()
    for a, b in zip(online, momentum):
        torch.testing.assert_close(a, b)
    assert not torch.equal(state["momentum_vision.blocks.0.attn.qkv.weight"], state["vision.blocks.0.attn.qkv.weight"])


def test_vlmae_on_patches_trains_on_a_corpus_with_images(tmp_path, image_corpus):
    """A debug run on shards with images (schema 2, `--store-images`' members): the image encoder
    over the visible patches, RMIM on their pixels; it exports and reloads whole. The same run on
    the conftest corpus (no images) stops at start, saying how to get them."""
    from vlp_train.pretrained import load

    common = ["model.visual=patches", "model.image_size=32", "model.patch_size=8", "data.batch_size=8",
              "optim.max_steps=4", "optim.epochs=4", "run.eval_batches=1"]
    cfg = config(image_corpus, tmp_path / "run", *common)
    summary = train(cfg)
    logged = [r for r in rows(cfg.run.output) if "loss" in r]
    assert len(logged) == 4 and all(np.isfinite(r["vl/rmim"]) and r["vl/rmim"] > 0 for r in logged)
    model = load(os.path.join(cfg.run.output, "hf"))
    assert model.visual == "patches" and model.vision.tokens.grid == 4
    assert np.isfinite(summary["eval"]["rmim"])
    no_images = write_shards(str(tmp_path / "c"), n_images=16, per_shard=16)
    with pytest.raises(ValueError, match="store-images"):
        train(config(no_images, tmp_path / "run2", *common))


def test_region_granularities_on_patches_alone_stop_at_start(tmp_path):
    """region-tag and region-phrase mask regions, which VLMAE on patches alone does not have: the
    run stops before any set-up, naming the tasks, rather than at its first batch."""
    from vlp_train.components import build_run

    cfg = config(str(tmp_path / "none-*.tar"), tmp_path / "run", "model.visual=patches", "objectives.region_tag=true")
    with pytest.raises(ValueError, match=r"cannot train rt with model.visual=patches"):
        build_run(cfg)



def _ddp_pair_rank(rank: int, port: int, results):
    """One rank of a 2-rank gloo group: the pair step under DDP, ranks of different batch sizes and
    region counts (so the visible states gathered for hard negatives are padded)."""
    import torch.distributed as dist

    from vlp_train.families import family_of
    from vlp_train.step import Pretraining
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tokenizer = BertTokenizerFast.from_pretrained(bundled_minilm_path())
        builder = BatchBuilder(tokenizer, {t: i for i, t in enumerate(sorted(TAGS))}, 40, 36, ObjectiveConfig())
        model = tiny_model()  # seeded: the same weights on both ranks
        step = torch.nn.parallel.DistributedDataParallel(Pretraining(model, family_of("vlmae")),
                                                         find_unused_parameters=True)
        torch.manual_seed(rank)  # each rank its own hard-negative draws
        samples = [grid_sample(10 * rank + i, [(1, 0.9)], n=8 if rank == 0 else 4) for i in range(3 - rank)]
        view = view_of(builder, samples, seed=rank)
        named, _, _ = step.train()({PAIR_TASK: view})[PAIR_TASK]
        sum(v.mean() for v in named.values()).backward()
        results[rank] = ({k: v.detach() for k, v in named.items()}, model.vision.blocks[0].attn.qkv.weight.grad.clone(),
                         model.momentum_vision.blocks[0].attn.qkv.weight.detach().clone(), view["visible"].shape[1])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_pair_step_under_ddp_gathers_across_ranks_and_agrees_on_gradients():
    import torch.multiprocessing as mp

    from .test_distributed import _run_ranks
    with mp.Manager() as manager:
        results = manager.dict()
        _run_ranks(_ddp_pair_rank, results, timeout=150)
        results = dict(results)
    assert results[0][3] != results[1][3]  # the ranks kept different numbers of elements
    assert results[0][0]["itc"].shape == (3,) and results[1][0]["rmim"].shape == (2,)
    assert all(torch.isfinite(v).all() for r in results.values() for v in r[0].values())
    torch.testing.assert_close(results[0][1], results[1][1])  # DDP's averaged gradient, the same on both
    torch.testing.assert_close(results[0][2], results[1][2])  # the momentum encoders move alike
