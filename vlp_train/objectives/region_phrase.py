"""Region-phrase alignment: [retrieved sentence, regions] with only linked items masked, one
modality per sample: MLM on masked phrase tokens, or p-MRTC (phrase-guided masked region to
token classification): a masked linked region predicts a sub-word of its phrase through the
MLM head (tied to the word embeddings)."""
import vlp_train.objectives as obj


def region_phrase_losses(model, view):
    text, regions = model(view["input_ids"], view["text_mask"], view["features"], view["locations"], view["region_mask"])
    losses = {"mlm": obj.per_sample_mean(obj.token_ce(model.mlm_logits(text), view["mlm_labels"]),
                                         view["mlm_labels"] != -100),
              "mrtc": obj.per_sample_mean(obj.token_ce(model.mlm_logits(regions), view["mrtc_labels"]),
                                          view["mrtc_labels"] != -100)}
    return losses, {"text": text, "regions": regions}
