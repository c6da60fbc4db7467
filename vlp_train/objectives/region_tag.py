"""Region-tag alignment: [tags as text, regions]; MLM on tag tokens; on masked regions MRC
(the region's tag class) and MRFR (L2 to the original features, never the zeroed input). On
patches a masked region is its hidden patches; MRC and MRFR read its pooled state (the
families' `encode`); without region features MRFR regresses each hidden patch's pixels."""
import vlp_train.objectives as obj


def region_tag_losses(model, view):
    text, regions, patches = obj.encode_view(model, view)
    mrc_mask = view["mrc_labels"] != -100
    losses = {"mlm": obj.masked_token_losses(model, text, view["mlm_positions"], view["mlm_targets"]),
              "mrc": obj.per_sample_mean(obj.token_ce(model.mrc(regions), view["mrc_labels"]), mrc_mask),
              "mrfr": region_regression_losses(model, view, regions, patches)}
    return losses, {"text": text, "regions": regions, "patches": patches}


def region_regression_losses(model, view, regions, patches):
    """MRFR, per sample [B]: the mean over the view's masked regions (`zeroed_regions`) of the L2
    error (mean over dims) between the MRFR head on a region's state and the region's original
    features (the view's clean ones: the model saw them zeroed, or their patches hidden). On
    patches without region features (`model.regresses_pixels`) each hidden patch's state regresses
    its own normalised pixels instead. `regions` [B, R, D] and `patches` [B, 1 + N, D] (visual
    [CLS] first) are the states of the encoder that saw the masked view: the fusion encoder for
    region-tag, VLMo's image-alone encoder for its vision stage."""
    if model.regresses_pixels:
        hidden = model.masked_patches(view["locations"], view["region_mask"], view["zeroed_regions"])
        target = model.patches.patch_pixels(view["pixels"])
        squared = (model.mrfr(patches[:, 1:]).float() - target).pow(2).mean(-1)
        return obj.per_sample_mean(squared, hidden)
    squared = (model.mrfr(regions).float() - view["features"].float()).pow(2).mean(-1)
    return obj.per_sample_mean(squared, view["zeroed_regions"])
