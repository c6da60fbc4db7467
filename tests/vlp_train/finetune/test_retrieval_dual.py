"""Retrieval as a dual encoder (VLMo's fine-tuning): the families' dual-encoder interface, the ITC
fine-tuning loss, dual-encoder ranking of a split, and the classification tasks still on the
fusion [T_CLS]."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from vlp_train.families import FAMILIES
from vlp_train.families.vlmo import IMAGE, TEXT, VLMoModel


def small_vlmo(layers=2, vl_layers=1) -> VLMoModel:
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return VLMoModel(config, feature_dim=6, tags=["cat"], vl_layers=vl_layers).eval()


def test_the_dual_encoder_is_the_projected_cls_of_the_one_modality_passes():
    """embed_images / embed_texts: the image alone through the V-FFN and the text alone through the
    L-FFN in every layer, [CLS] -> projection -> L2; the families that have one say so."""
    assert {name for name, f in FAMILIES.items() if f.dual_encoder} == {"vlmo", "vlmae"}
    model = small_vlmo()
    modes = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, args, out: modes.append(args[2]))
    ids, text_mask = torch.randint(5, 100, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    features, locations, region_mask = torch.randn(3, 2, 6), torch.rand(3, 2, 5), torch.ones(3, 2, dtype=torch.bool)
    images = model.embed_images(features, locations, region_mask)
    assert modes == [IMAGE, IMAGE]
    modes.clear()
    texts = model.embed_texts(ids, text_mask)
    assert modes == [TEXT, TEXT]
    expected = F.normalize(model.image_proj(model.encode_image(features, locations, region_mask)[:, 0]), dim=-1)
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
    assert model.contrast_log_scale is model.logit_scale


def test_vlmaes_dual_encoder_is_its_online_encoders_over_the_whole_image():
    from vlp_train.families.vlmae import VLMAEModel
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = VLMAEModel(config, {"feature_dim": 6, "tags": ["cat"], "fusion_layers": 1, "vision": [1, 16, 2],
                                "decoder": [1, 16, 2]}).eval()
    features, locations, region_mask = torch.randn(3, 2, 6), torch.rand(3, 2, 5), torch.ones(3, 2, dtype=torch.bool)
    view = {"features": features, "locations": locations, "region_mask": region_mask}
    expected = F.normalize(model.vision_proj(model.vision(view)[0][:, 0]), dim=-1)
    torch.testing.assert_close(model.embed_images(features, locations, region_mask), expected)
    ids, text_mask = torch.randint(5, 100, (3, 4)), torch.ones(3, 4, dtype=torch.bool)
    assert model.embed_texts(ids, text_mask).shape == (3, VLMAEModel.CONTRAST_DIM)
    assert model.contrast_log_scale is model.itc_log_scale
