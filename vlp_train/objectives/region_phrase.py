"""Region-phrase alignment: [retrieved sentence, regions] with only linked items masked, one
modality per sample: MLM on masked phrase tokens, or p-MRTC (phrase-guided masked region to
token classification): a masked linked region predicts its phrase's content sub-tokens through
the MLM head (tied to the word embeddings)."""
import vlp_train.objectives as obj


def region_phrase_losses(model, view):
    text, regions, patches = obj.encode_view(model, view)
    losses = {"mlm": obj.masked_token_losses(model, text, view["mlm_positions"], view["mlm_targets"]),
              "mrtc": obj.phrase_token_losses(model, regions, view["mrtc_positions"], view["mrtc_targets"])}
    return losses, {"text": text, "regions": regions, "patches": patches}
