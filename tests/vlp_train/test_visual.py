"""The patch input: region -> patch mapping, the patch embedding, position-embedding resizing, the
ViT folder reader (timm and Hugging Face layouts), pixel decoding."""
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.corpus import encode_image
from vlp_train.masking import locations
from vlp_train.visual import (IMAGENET_MEAN, PatchEmbedding, box_patches, load_pixels, pool_regions, read_vit,
                              resize_pos_embed)


def patches_of(box, width, height, grid):
    """The patch set of one pixel box through the loader's path (masking.locations) -> {(row, col)}."""
    locs = torch.from_numpy(locations(np.asarray([box], np.float32), width, height))
    covered = box_patches(locs, grid)[0].view(grid, grid)
    return {(int(r), int(c)) for r, c in covered.nonzero()}


def expected_cells(lo, hi, size, grid):
    """Exact reference for one axis: the cells [c, c+1) (in grid units) the clipped span overlaps
    with a positive length; a span with none (no length left after clipping) -> its centre's cell."""
    lo, hi = sorted((Fraction(lo), Fraction(hi)))
    lo, hi = (min(max(v, Fraction(0)), Fraction(size)) * grid / size for v in (lo, hi))
    cells = {c for c in range(grid) if min(hi, c + 1) - max(lo, c) > 0}
    return cells or {min(int(math.floor((lo + hi) / 2)), grid - 1)}


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 1500), height=st.integers(1, 1500), grid=st.integers(1, 32),
       x1=st.integers(-200, 1700), x2=st.integers(-200, 1700), y1=st.integers(-200, 1700), y2=st.integers(-200, 1700))
def test_a_box_of_any_size_anywhere_covers_exactly_the_patches_it_overlaps(width, height, grid, x1, x2, y1, y2):
    """Boxes of every size (a point, a line, one pixel, the whole image), inside, at the edges,
    beyond them, corners swapped: the patches with a positive overlap, and never none."""
    got = patches_of([x1, y1, x2, y2], width, height, grid)
    rows, cols = expected_cells(y1, y2, height, grid), expected_cells(x1, x2, width, grid)
    assert got == {(r, c) for r in rows for c in cols}
    assert got  # every region has at least one patch


@pytest.mark.parametrize("box, expected", [
    ([0, 0, 384, 384], {(r, c) for r in range(24) for c in range(24)}),           # the whole image
    ([0, 0, 16, 16], {(0, 0)}),                                                    # one patch exactly
    ([368, 368, 384, 384], {(23, 23)}),                                            # the last one, at the edge
    ([383, 383, 384, 384], {(23, 23)}),                                            # one pixel in the corner
    ([380, 100, 900, 120], {(6, 23), (7, 23)}),                                    # beyond the right edge: clipped
    ([-50, -50, 8, 8], {(0, 0)}),                                                  # beyond the top-left corner
    ([500, 500, 600, 600], {(23, 23)}),                                            # wholly outside: the nearest edge patch
    ([16, 16, 16, 16], {(1, 1)}),                                                  # a point on a patch corner
    ([15, 0, 17, 16], {(0, 0), (0, 1)}),                                           # 2 px across a boundary: both
    ([32, 48, 16, 16], {(1, 1), (2, 1)}),                                          # corners swapped
])
def test_boxes_at_the_edges_and_of_every_size_on_a_384_grid(box, expected):
    assert patches_of(box, 384, 384, 24) == expected


def test_a_box_maps_by_its_fraction_of_the_original_image_whatever_its_aspect():
    """The image is resized to the square (aspect not kept): a box over the right half of a wide
    image covers the right half of the grid's columns, every row."""
    assert patches_of([320, 0, 640, 200], 640, 200, 4) == {(r, c) for r in range(4) for c in (2, 3)}


def test_region_states_pool_their_patches():
    states = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 2)  # patch p has state p
    regions = torch.tensor([[[True, True, False, False], [False, False, False, True], [False] * 4]])
    pooled = pool_regions(states, regions)
    assert pooled[0, :, 0].tolist() == [0.5, 3.0, 0.0]  # a padding region (no patch) pools to 0


def embedding(image_size=32, patch=8, hidden=16):
    torch.manual_seed(0)
    return PatchEmbedding(hidden, image_size, patch, torch.nn.Embedding(2, hidden), 1e-12, 0.0).eval()


def test_patch_embedding_shape_and_masking():
    emb = embedding()
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    other = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    out = emb(pixels)
    assert out.shape == (2, 1 + 16, 16)
    everything = torch.ones(2, 16, dtype=torch.bool)
    torch.testing.assert_close(emb(pixels, everything), emb(other, everything))  # nothing of the image gets through
    assert not torch.allclose(emb(pixels), emb(other))
    one = torch.zeros(2, 16, dtype=torch.bool)
    one[:, 5] = True
    changed = (emb(pixels, one) - out).abs().sum(-1) > 1e-6
    assert changed[:, 1 + 5].all() and changed.sum() == 2  # only that patch's token (position 1 + 5)


def test_pixels_are_normalised_on_the_device_with_the_vits_statistics():
    emb = embedding()
    grey = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    x = emb.normalise(grey)
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, (0.229, 0.224, 0.225))]))
    targets = emb.patch_pixels(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    assert targets.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)  # each patch standardised


def test_position_embeddings_resize_bicubically_and_keep_the_cls():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_pos_embed(pos, 14) is pos
    resized = resize_pos_embed(pos, 24)
    assert resized.shape == (1, 1 + 24 * 24, 8)
    torch.testing.assert_close(resized[:, 0], pos[:, 0])
    ramp = torch.linspace(0, 1, 14).view(1, 14).expand(14, 14).reshape(1, 196, 1)  # left to right
    out = resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), ramp], 1), 24)[0, 1:, 0].view(24, 24)
    assert (out[:, 1:] >= out[:, :-1] - 1e-5).all() and out[0, 0] < 0.05 and out[0, -1] > 0.95
    no_cls = resize_pos_embed(torch.randn(1, 49, 4), 3)
    assert no_cls.shape == (1, 9, 4)
    with pytest.raises(ValueError, match="no square grid"):
        resize_pos_embed(torch.randn(1, 51, 4), 3)


# -- ViT folders ------------------------------------------------------------------------------

def hf_vit(folder, image_size=32, patch=8, hidden=32, layers=2, classifier=False):
    """A real (random) Hugging Face ViT saved as transformers saves one."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    config = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=2, intermediate_size=2 * hidden, num_labels=3)
    torch.manual_seed(1)
    model = (ViTForImageClassification if classifier else ViTModel)(config)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, f)
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))  # the names on disk (the hub's)


def timm_folder_from(hf_state, folder, prefix):
    """The same weights in timm's layout and file format (pytorch_model.bin, config.json with
    pretrained_cfg), written from the names as timm's ViT has them."""
    p = prefix
    state = {"cls_token": hf_state[f"{p}embeddings.cls_token"], "pos_embed": hf_state[f"{p}embeddings.position_embeddings"],
             "patch_embed.proj.weight": hf_state[f"{p}embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": hf_state[f"{p}embeddings.patch_embeddings.projection.bias"],
             "norm.weight": hf_state[f"{p}layernorm.weight"], "norm.bias": hf_state[f"{p}layernorm.bias"]}
    for i in range(2):
        layer = f"{p}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [hf_state[f"{layer}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            state[f"blocks.{i}.attn.proj.{kind}"] = hf_state[f"{layer}attention.output.dense.{kind}"]
            state[f"blocks.{i}.norm1.{kind}"] = hf_state[f"{layer}layernorm_before.{kind}"]
            state[f"blocks.{i}.norm2.{kind}"] = hf_state[f"{layer}layernorm_after.{kind}"]
            state[f"blocks.{i}.mlp.fc1.{kind}"] = hf_state[f"{layer}intermediate.dense.{kind}"]
            state[f"blocks.{i}.mlp.fc2.{kind}"] = hf_state[f"{layer}output.dense.{kind}"]
    os.makedirs(folder)
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architecture": "vit_tiny_patch8_32", "num_features": 32,
                   "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}, f)
    return state


@pytest.mark.parametrize("classifier", [False, True], ids=["ViTModel", "ViTForImageClassification"])
def test_a_hugging_face_vit_and_its_timm_twin_read_as_the_same_canonical_weights(tmp_path, classifier):
    hf_state = hf_vit(str(tmp_path / "hf"), classifier=classifier)
    timm_state = timm_folder_from(hf_state, str(tmp_path / "timm"), "vit." if classifier else "")
    hf_weights, hf_info = read_vit(str(tmp_path / "hf"))
    timm_weights, timm_info = read_vit(str(tmp_path / "timm"))
    assert set(timm_weights) == set(timm_state)
    assert set(hf_weights) - set(timm_weights) <= {"head.weight", "head.bias"}  # the classifier, when there is one
    for name in timm_weights:
        torch.testing.assert_close(hf_weights[name], timm_weights[name], rtol=0, atol=0)
    for info in (hf_info, timm_info):
        assert (info["image_size"], info["patch_size"], info["hidden"], info["layers"]) == (32, 8, 32, 2)
        assert info["mean"] == (0.5, 0.5, 0.5) and info["std"] == (0.5, 0.5, 0.5)


def test_read_vit_refuses_what_is_not_a_vit(tmp_path):
    from safetensors.torch import save_file
    os.makedirs(tmp_path / "bert")
    save_file({"embeddings.word_embeddings.weight": torch.zeros(4, 4)}, str(tmp_path / "bert" / "model.safetensors"))
    with pytest.raises(ValueError, match="not a ViT"):
        read_vit(str(tmp_path / "bert"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_vit(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        read_vit(str(tmp_path / "empty"))


def test_a_vit_at_another_resolution_initialises_the_patch_embedding(tmp_path):
    """A ViT trained at 32 px (4 x 4 patches) into a model at 64 px (8 x 8): the projection and
    [CLS] as they are, the position embeddings resized."""
    hf_vit(str(tmp_path / "vit"))
    weights, _ = read_vit(str(tmp_path / "vit"))
    emb = embedding(image_size=64, patch=8, hidden=32)
    emb.load_vit(weights, "vit")
    torch.testing.assert_close(emb.patch_embed.proj.weight, weights["patch_embed.proj.weight"])
    torch.testing.assert_close(emb.cls_token, weights["cls_token"])
    torch.testing.assert_close(emb.pos_embed, resize_pos_embed(weights["pos_embed"], 8))
    with pytest.raises(ValueError, match="hidden size is 16"):
        embedding(image_size=64, patch=8, hidden=16).load_vit(weights, "vit")
    with pytest.raises(ValueError, match="model.patch_size=16"):
        embedding(image_size=64, patch=16, hidden=32).load_vit(weights, "vit")


# -- pixels -----------------------------------------------------------------------------------

def test_load_pixels_resizes_the_whole_image_to_the_square():
    image = np.zeros((72, 96, 3), np.uint8)
    image[:, 48:] = (250, 10, 10)  # right half red
    pixels = load_pixels(encode_image(image, 96), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels[:, :14, 0].max() < 40 and pixels[:, 18:, 0].min() > 200  # the right half stays the right half
    big = load_pixels(encode_image(np.full((900, 1200, 3), 128, np.uint8), 1200), 64)  # DCT-scaled decode
    assert big.shape == (64, 64, 3) and abs(int(big.mean()) - 128) <= 2
    from PIL import Image
    import io
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    assert load_pixels(png.getvalue(), 32).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="undecodable image"):
        load_pixels(b"\xff\xd8\xff\xe0" + b"\x00" * 50, 32)
