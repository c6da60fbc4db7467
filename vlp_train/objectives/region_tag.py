"""Region-tag alignment: [tags as text, regions]; MLM on tag tokens; on masked regions MRC
(the region's tag class) and MRFR (L2 to the original features, never the zeroed input). On
patches a masked region is its hidden patches; MRC and MRFR read its pooled state (the
families' `encode`); without region features MRFR regresses each hidden patch's pixels."""
import vlp_train.objectives as obj


def region_tag_losses(model, view):
    text, regions, patches = obj.encode_view(model, view)
    mrc_mask = view["mrc_labels"] != -100
    losses = {"mlm": obj.masked_token_losses(model, text, view["mlm_positions"], view["mlm_targets"]),
              "mrc": obj.per_sample_mean(obj.token_ce(model.mrc(regions), view["mrc_labels"]), mrc_mask)}
    if getattr(model, "regresses_pixels", False):
        # patches without region features: each hidden patch regresses its own normalised pixels
        hidden = model.masked_patches(view["locations"], view["region_mask"], view["zeroed_regions"])
        target = model.patches.patch_pixels(view["pixels"])
        squared = (model.mrfr(patches[:, 1:]).float() - target).pow(2).mean(-1)
        losses["mrfr"] = obj.per_sample_mean(squared, hidden)
    else:
        # the target is the view's clean features; the model saw them zeroed (or their patches
        # hidden) at `zeroed_regions`
        squared = (model.mrfr(regions).float() - view["features"].float()).pow(2).mean(-1)
        losses["mrfr"] = obj.per_sample_mean(squared, view["zeroed_regions"])
    return losses, {"text": text, "regions": regions, "patches": patches}
