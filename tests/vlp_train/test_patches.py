"""The patch input end to end: the loader's pixels, shards without images, the granularities on
patches (a masked region hides its patches), vision_init, save/load, and short training runs with
model.visual=patches and both (resume exact)."""
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from vlp_train.components import build_run
from vlp_train.config import load_config
from vlp_train.data import decode_batch, expand_shards
from vlp_train.families import single_stream
from vlp_train.objectives import encode_view
from vlp_train.objectives.region_tag import region_tag_losses
from vlp_train.tasks import Task
from vlp_train.train import train

from .conftest import TINY_PATCHES, write_shards
from .test_visual import hf_vit


def raws(shards):
    return list(wds.tariterators.tarfile_samples({"url": u} for u in expand_shards(shards)))


def first_views(run):
    """The first batch's views as the step gets them (on the device: features widened)."""
    from vlp_train.step import to_device
    return to_device(next(iter(run.dataset))["views"], torch.device("cpu"))


def config(shards, out, *overrides, visual="patches"):
    cfg = load_config("debug", TINY_PATCHES + [f"model.visual={visual}", "data.batch_size=8", "run.log_every=1",
                                               *overrides])
    cfg.data.shards, cfg.run.output = shards, str(out)
    return cfg


def test_the_loader_decodes_each_image_to_the_models_square(image_shards):
    decoded, errors = decode_batch(raws(image_shards)[:4], image_size=64)
    assert not errors and len(decoded) == 4
    for sample in decoded:
        assert sample["pixels"].shape == (64, 64, 3) and sample["pixels"].dtype == np.uint8
        assert "image" not in sample  # the bytes are not carried past decoding
    regions_only, _ = decode_batch(raws(image_shards)[:1])  # a regions model decodes no image
    assert "pixels" not in regions_only[0]


def test_a_sample_without_its_image_or_with_a_damaged_one_is_skipped_and_named(image_shards, tiny_shards):
    good = raws(image_shards)[:3]
    damaged = dict(good[1], jpg=good[1]["jpg"][:200])  # cut short: a JPEG start, no picture
    decoded, errors = decode_batch([good[0], damaged, raws(tiny_shards)[0]], image_size=64)
    assert [d["key"] for d in decoded] == [good[0]["__key__"]]
    assert len(errors) == 2
    assert damaged["__key__"] in errors[0] and "jpg" in errors[0]
    assert "--store-images" in errors[1] and raws(tiny_shards)[0]["__key__"] in errors[1]


def test_a_patch_run_that_regresses_no_region_features_leaves_them_undecoded(image_shards, tmp_path):
    """model.visual=patches without region-tag (and VLMo's vision stage), whose MRFR is the only
    objective that reads region features on patches: the loader skips the features member (here
    damaged, so decoding it would make the sample a bad one) and the views carry [B, R, 0]."""
    from vlp_train.data import reads_region_features
    good = raws(image_shards)[:3]
    damaged = [dict(raw, **{"feats.npy": b"not an npy"}) for raw in good]
    decoded, errors = decode_batch(damaged, feature_dim=16, image_size=64, region_features=False)
    assert not errors and [d["feats"].shape for d in decoded] == [(len(d["meta"]["boxes"]), 0) for d in decoded]
    _, errors = decode_batch(damaged, feature_dim=16, image_size=64)  # a run that reads them: bad samples
    assert len(errors) == 3 and all("undecodable" in e for e in errors)
    assert not reads_region_features("patches", [Task.IMAGE_SENTENCE, Task.IMAGE_TEXT, Task.REGION_PHRASE])
    assert reads_region_features("patches", [Task.IMAGE_SENTENCE, Task.REGION_TAG])
    assert reads_region_features("patches", [Task.IMAGE_ONLY]) and reads_region_features("both", [Task.IMAGE_TEXT])

    run = build_run(config(image_shards, tmp_path / "run", "objectives.region_tag=false",
                           "objectives.region_phrase=false", "objectives.itm_weighting=false"))
    assert not run.builder.region_features
    view = first_views(run)[Task.IMAGE_SENTENCE]
    assert view["features"].shape[-1] == 0 and view["pixels"].shape[1:] == (64, 64, 3)
    losses, _ = single_stream.FAMILY.objectives[Task.IMAGE_SENTENCE](run.model, view)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert build_run(config(image_shards, tmp_path / "rt")).builder.region_features  # region-tag's MRFR reads them


def test_patches_on_shards_without_images_stop_at_start_naming_the_shard_and_the_flag(tiny_shards, tmp_path):
    cfg = config(tiny_shards, tmp_path / "run")
    first = raws(tiny_shards)[0]
    with pytest.raises(ValueError, match="--store-images") as err:
        build_run(cfg)
    assert first["__key__"] in str(err.value) and "corpus-000000.tar" in str(err.value)
    cfg.model.visual = "regions"
    assert build_run(cfg).builder.image_size is None  # the same shards train regions


def test_a_family_refuses_a_visual_input_it_does_not_take(image_shards, tmp_path):
    cfg = config(image_shards, tmp_path / "run", visual="both")
    cfg.model.arch = "vlmae"  # it takes regions or patches (families/vlmae.py), not both at once
    with pytest.raises(ValueError, match="model.arch=vlmae takes model.visual=regions or patches, not both"):
        build_run(cfg)


def test_every_view_of_a_batch_carries_the_same_pixels(image_shards, tmp_path):
    run = build_run(config(image_shards, tmp_path / "run", "objectives.schedule=mixed"))
    batch = next(iter(run.dataset))
    views = batch["views"]
    assert set(views) == {Task.REGION_TAG, Task.REGION_PHRASE, Task.IMAGE_SENTENCE}
    pixels = views[Task.REGION_TAG]["pixels"]
    assert pixels.shape == (8, 64, 64, 3) and pixels.dtype == torch.uint8
    assert all(v["pixels"] is pixels for v in views.values())
    from vlp_train.step import to_device
    moved = to_device(views, torch.device("cpu"))
    assert all(v["pixels"] is moved[Task.REGION_TAG]["pixels"] for v in moved.values())  # copied once
    if torch.cuda.is_available():  # the DataLoader's pinning (CUDA only) pins it once too
        from torch.utils.data._utils.pin_memory import pin_memory
        pinned = pin_memory(batch)["views"]
        assert all(v["pixels"] is pinned[Task.REGION_TAG]["pixels"] for v in pinned.values())


@pytest.mark.parametrize("visual", ["patches", "both"])
def test_a_masked_region_hides_its_patches_and_nothing_of_it_leaks(image_shards, tmp_path, visual):
    """Masking a region hides the patches under its box: the model's every output is the same
    whatever those pixels (and, in `both`, its features) hold, and changes when a pixel elsewhere does."""
    run = build_run(config(image_shards, tmp_path / "run", "model.dropout=0.0", visual=visual))
    model = run.model.eval()
    view = dict(first_views(run)[Task.REGION_TAG])
    zeroed = torch.zeros_like(view["region_mask"])
    zeroed[0, 0] = True  # sample 0's first region
    view["zeroed_regions"] = zeroed
    hidden = model.masked_patches(view["locations"], view["region_mask"], zeroed)[0].view(4, 4)
    assert hidden.any() and not hidden.all()
    under = hidden.repeat_interleave(16, 0).repeat_interleave(16, 1)  # [64, 64] pixels under the hidden patches
    with torch.no_grad():
        text, regions, patches = encode_view(model, view)
        changed = dict(view, pixels=view["pixels"].clone(), features=view["features"].clone())
        changed["pixels"][0][under] = 255 - changed["pixels"][0][under]
        changed["features"][0, 0] += 5.0
        text2, regions2, patches2 = encode_view(model, changed)
        torch.testing.assert_close((text, regions, patches), (text2, regions2, patches2))
        elsewhere = dict(view, pixels=view["pixels"].clone())
        elsewhere["pixels"][0][~under] = 255 - elsewhere["pixels"][0][~under]
        assert not torch.allclose(encode_view(model, elsewhere)[0], text)
    assert regions.shape[:2] == view["region_mask"].shape and patches.shape[1] == 1 + 16


def test_mrfr_regresses_the_hidden_patches_pixels_when_the_corpus_has_no_region_features(image_shards, tmp_path):
    run = build_run(config(image_shards, tmp_path / "run"))
    view = first_views(run)[Task.REGION_TAG]
    view = dict(view, features=view["features"][..., :0])  # regions without features
    cfg = run.cfg.model
    model = single_stream.SingleStreamModel(run.model.bert.config, 0, run.tags, "patches", cfg.image_size, cfg.patch_size)
    assert model.regresses_pixels and model.mrfr[-1].out_features == 16 * 16 * 3
    losses, _ = region_tag_losses(model, view)
    masked = model.masked_patches(view["locations"], view["region_mask"], view["zeroed_regions"]).any(1)
    assert torch.isfinite(losses["mrfr"]).all()
    assert ((losses["mrfr"] > 0) == masked).all()  # a loss exactly for the samples with a hidden patch
    losses["mrfr"].sum().backward()
    assert model.patches.mask_token.grad.abs().sum() > 0


def test_vision_init_starts_the_patch_embedding_from_a_vit_and_save_load_keeps_it(image_shards, tmp_path):
    hf_vit(str(tmp_path / "vit"), image_size=32, patch=16, hidden=64)  # 2 x 2 patches, into a 4 x 4 grid
    run = build_run(config(image_shards, tmp_path / "run", f"model.vision_init={tmp_path / 'vit'}"))
    patches = run.model.patches
    from vlp_train.visual import read_vit, resize_pos_embed
    weights, _ = read_vit(str(tmp_path / "vit"))
    torch.testing.assert_close(patches.patch_embed.proj.weight, weights["patch_embed.proj.weight"])
    torch.testing.assert_close(patches.pos_embed, resize_pos_embed(weights["pos_embed"], 4))
    assert patches.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the ViT's statistics (its preprocessor_config)
    run.model.save_pretrained(str(tmp_path / "saved"))
    from vlp_train import pretrained
    loaded = pretrained.load(str(tmp_path / "saved"))
    assert loaded.visual == "patches" and loaded.patches.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    view = first_views(run)[Task.REGION_TAG]
    with torch.no_grad():
        torch.testing.assert_close(encode_view(run.model.eval(), view), encode_view(loaded, view))
    # starting a run from it: the same visual input, or a clear error
    again = build_run(config(image_shards, tmp_path / "run2", f"model.init={tmp_path / 'saved'}"))
    torch.testing.assert_close(again.model.patches.pos_embed, patches.pos_embed)
    with pytest.raises(ValueError, match="sees images as patches"):
        build_run(config(image_shards, tmp_path / "run3", f"model.init={tmp_path / 'saved'}", visual="both"))


def logged(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_patches_train_and_resume_exactly(tmp_path):
    """A corpus built as with --store-images trains with model.visual=patches: every granularity's
    losses, finite; killed and resumed, the same losses and weights as a run never stopped."""
    shards = write_shards(str(tmp_path / "c"), n_images=32, per_shard=16, images=96)
    common = ["optim.max_steps=4", "optim.epochs=4", "objectives.schedule=mixed", "run.eval_batches=1"]
    whole = config(shards, tmp_path / "whole", *common)
    summary = train(whole)
    rows = [r for r in logged(whole.run.output) if "loss" in r]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    assert {"rt/mlm", "rt/mrc", "rt/mrfr", "rp/mrtc", "is/itm", "is/mlm"} <= set().union(*rows)
    assert {"mrc_acc", "itm_acc"} <= set(summary["eval"])
    broken = config(shards, tmp_path / "broken", *common, "run.save_every=2", "run.stop_after=3")
    assert train(broken)["stopped"]
    resumed = load_config("debug")
    resumed.run.output = str(tmp_path / "broken")
    assert train(resumed, resume=True)["steps"] == 4
    losses = lambda d: {r["step"]: r["loss"] for r in logged(d) if "loss" in r}  # noqa: E731
    assert losses(broken.run.output) == losses(whole.run.output)
    from vlp_train import pretrained
    a, b = pretrained.load(whole.run.output), pretrained.load(broken.run.output)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_both_trains_on_regions_and_patches(tmp_path):
    shards = write_shards(str(tmp_path / "c"), n_images=32, per_shard=16, images=96)
    cfg = config(shards, tmp_path / "run", "optim.max_steps=3", "optim.epochs=3", "objectives.schedule=mixed",
                 "run.eval_batches=1", visual="both")
    train(cfg)
    rows = [r for r in logged(cfg.run.output) if "loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    from vlp_train import pretrained
    model = pretrained.load(cfg.run.output)
    assert model.visual == "both" and model.region is not None and model.patches is not None


@pytest.mark.slow
def test_patches_train_compiled_one_layer_for_all(tmp_path):
    """model.compile=on in the default layer scope (what CUDA runs): the patch sequence goes through
    the compiled layer. (The step scope compiled too when tried by hand: about 2 minutes here.)"""
    shards = write_shards(str(tmp_path / "c"), n_images=16, per_shard=16, images=96)
    cfg = config(shards, tmp_path / "run", "model.compile=on", "optim.max_steps=2", "optim.epochs=2",
                 "run.eval_batches=1", "objectives.schedule=mixed", "objectives.itm_weighting=false")
    assert train(cfg)["steps"] == 2
    rows = [r for r in logged(cfg.run.output) if "loss" in r]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
