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

import vlp_train.objectives as obj
from vlp_train.objectives.contrastive import gather_padded, itc_losses, itm_with_hard_negatives
from vlp_train.objectives.region_tag import region_regression_losses


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
    ids = gather_padded(view["clean_ids"])[0]
    text_mask = gather_padded(view["text_mask"], pad_value=False)[0]
    all_features = gather_padded(features)[0]
    all_locations = gather_padded(locations)[0]
    all_region_mask = gather_padded(region_mask, pad_value=False)[0]
    all_pixels = gather_padded(pixels)[0] if pixels is not None else None

    def pair_logits(text_rows, image_rows):
        fused_text, _ = model(ids[text_rows], text_mask[text_rows], all_features[image_rows],
                              all_locations[image_rows], all_region_mask[image_rows],
                              all_pixels[image_rows] if all_pixels is not None else None)
        return model.itm_logits(fused_text)
    itm, itm_logits = itm_with_hard_negatives(contrast, keys, pair_logits)

    masked_text, _ = model(view["input_ids"], view["text_mask"], features, locations, region_mask, pixels)
    mlm = obj.masked_token_losses(model, masked_text, view["mlm_positions"], view["mlm_targets"])
    return {"itc": contrast.losses, "itm": itm, "mlm": mlm}, {"itm_logits": itm_logits[:features.shape[0]]}


def image_only_regression(model, view):
    """(per-sample regression error of the masked regions, region states): the image alone with its
    masked regions' features zeroed and (on patches) the patches under them hidden, regressed as
    region-tag's MRFR is (`region_regression_losses`)."""
    locations, region_mask, zeroed = view["locations"], view["region_mask"], view["zeroed_regions"]
    pixels = view.get("pixels")
    hidden = model.encode_image(obj.input_features(view), locations, region_mask, pixels,
                                zeroed if pixels is not None else None)
    regions, patches = model.image_parts(hidden, locations, region_mask)
    return region_regression_losses(model, view, regions, patches), regions


def image_only_losses(model, view):
    error, regions = image_only_regression(model, view)
    return {"mrfr": error}, {"regions": regions}


def text_only_losses(model, view):
    states = model.encode_text(view["input_ids"], view["text_mask"])
    return {"mlm": obj.masked_token_losses(model, states, view["mlm_positions"], view["mlm_targets"])}, {"text": states}
