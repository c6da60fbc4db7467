"""VLMo's objectives (vlp_train/families/vlmo.py), as named per-sample losses.

- image-text (`vl`): ITC between the image alone (V-FFN) and its retrieved sentence alone (L-FFN)
  over the global batch; ITM on the fusion [T_CLS] of three pairs per sample (its own, its text
  with a hard negative image, its image with a hard negative text; the negatives drawn from the
  ITC similarities over the global batch); MLM on the fusion encoder over the masked sentence
  and its image. VLMo's sum is 0.25 MLM + ITC + ITM; here each has weight 1, as every other
  named loss of the trainer (docs/trainer.md).
- image alone (`img`, the vision stage): the masked regions' features regressed (L2) from the
  V-FFN encoder, through the MRFR head (BEiT's visual tokens need a tokenizer we do not have); on
  patches the patches under a masked region are hidden, and without region features each hidden
  patch regresses its own normalised pixels.
- text alone (`txt`, the language stage): MLM through the L-FFN encoder.
"""
import torch
import torch.nn.functional as F

import vlp_train.objectives as obj
from vlp_train.objectives.contrastive import gather_padded, hard_negatives, itc_losses


def image_text_losses(model, view):
    features, locations, region_mask = view["features"], view["locations"], view["region_mask"]
    pixels = view.get("pixels")  # model.visual patches / both
    keys = view["text_keys"]
    image_states = model.encode_image(features, locations, region_mask, pixels)
    text_states = model.encode_text(view["clean_ids"], view["text_mask"])
    contrast = itc_losses(model.image_features(image_states), model.text_features(text_states), model.logit_scale,
                          text_keys=keys, image_keys=view.get("retrieved_keys"))

    # ITM: each sample's pair, its text with a hard negative image, its image with a hard negative
    # text; the negatives may come from any rank, so every rank's inputs are gathered (no gradient)
    negative_text, negative_image, valid = hard_negatives(contrast, keys)
    ids = gather_padded(view["clean_ids"])[0]
    text_mask = gather_padded(view["text_mask"], pad_value=False)[0]
    all_features = gather_padded(features)[0]
    all_locations = gather_padded(locations)[0]
    all_region_mask = gather_padded(region_mask, pad_value=False)[0]
    all_pixels = gather_padded(pixels)[0] if pixels is not None else None
    batch = features.shape[0]
    own = contrast.offset + torch.arange(batch, device=features.device)
    text_rows = torch.cat([own, own, negative_text])
    image_rows = torch.cat([own, negative_image, own])
    fused_text, _ = model(ids[text_rows], text_mask[text_rows], all_features[image_rows], all_locations[image_rows],
                          all_region_mask[image_rows], all_pixels[image_rows] if all_pixels is not None else None)
    itm_logits = model.itm_logits(fused_text)
    labels = torch.cat([torch.ones(batch, dtype=torch.long, device=features.device),
                        torch.zeros(2 * batch, dtype=torch.long, device=features.device)])
    pair_losses = F.cross_entropy(itm_logits.float(), labels, reduction="none").view(3, batch)
    counted = torch.stack([torch.ones_like(valid), valid, valid]).float()  # a sample without a negative: its pair only
    itm = (pair_losses * counted).sum(0) / counted.sum(0)

    masked_text, _ = model(view["input_ids"], view["text_mask"], features, locations, region_mask, pixels)
    mlm = obj.masked_token_losses(model, masked_text, view["mlm_positions"], view["mlm_targets"])
    return {"itc": contrast.losses, "itm": itm, "mlm": mlm}, {"itm_logits": itm_logits[:batch]}


def image_only_regression(model, view):
    """(per-sample regression error of the masked regions, region states): the image alone with its
    masked regions' features zeroed and (on patches) the patches under them hidden, regressed to
    the regions' features, or without region features each hidden patch to its own pixels."""
    locations, region_mask, zeroed = view["locations"], view["region_mask"], view["zeroed_regions"]
    pixels = view.get("pixels")
    hidden = model.encode_image(obj.input_features(view), locations, region_mask, pixels,
                                zeroed if pixels is not None else None)
    regions, patches = model.image_parts(hidden, locations, region_mask)
    if getattr(model, "regresses_pixels", False):
        masked = model.masked_patches(locations, region_mask, zeroed)
        target = model.patches.patch_pixels(pixels)
        squared = (model.mrfr(patches[:, 1:]).float() - target).pow(2).mean(-1)
        return obj.per_sample_mean(squared, masked), regions
    # the target is the view's clean features; the model saw them zeroed (or their patches hidden)
    squared = (model.mrfr(regions).float() - view["features"].float()).pow(2).mean(-1)
    return obj.per_sample_mean(squared, zeroed), regions


def image_only_losses(model, view):
    error, regions = image_only_regression(model, view)
    return {"mrfr": error}, {"regions": regions}


def text_only_losses(model, view):
    states = model.encode_text(view["input_ids"], view["text_mask"])
    return {"mlm": obj.masked_token_losses(model, states, view["mlm_positions"], view["mlm_targets"])}, {"text": states}
