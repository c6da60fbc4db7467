"""Image-sentence alignment: ITM (retrieved sentence = match, another image's sentence =
mismatch) on [CLS], plus MLM on the matched pairs."""
import torch.nn.functional as F

import vlp_train.objectives as obj


def image_sentence_losses(model, view):
    text, regions, patches = obj.encode_view(model, view)
    itm_logits = model.itm_logits(text)
    losses = {"itm": F.cross_entropy(itm_logits.float(), view["itm_labels"], reduction="none"),
              "mlm": obj.masked_token_losses(model, text, view["mlm_positions"], view["mlm_targets"])}
    return losses, {"text": text, "regions": regions, "patches": patches, "itm_logits": itm_logits}
