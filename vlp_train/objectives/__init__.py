"""One module per granularity. Each takes the model and a view (see masking.py) and returns
named per-sample losses, shape [B] (0 where a sample has nothing of that kind), plus outputs.
A model family maps its tasks to these (vlp_train/families/); the helpers below are shared."""
from vlp_train.tasks import IGNORE, Task  # noqa: F401  (IGNORE re-exported: the label the losses skip)

# the tasks whose objectives read the regions' features as a target (MRFR: region-tag's and VLMo's
# vision stage, `region_tag.region_regression_losses`), even when the model sees patches; on
# patches no other objective reads them, so such a run's loader leaves them undecoded
# (`data.reads_region_features`)
FEATURE_TARGET_TASKS = (Task.REGION_TAG, Task.IMAGE_ONLY)


def input_features(view):
    """The region features the model sees: the view's (clean) features with its
    `zeroed_regions` set to 0. Views carry one feature tensor, the clean one, and the mask: the
    masked copy is made here, on the device, instead of being built and shipped by the loader."""
    zeroed = view.get("zeroed_regions")
    return view["features"] if zeroed is None else view["features"].masked_fill(zeroed.unsqueeze(-1), 0.0)


def encode_view(model, view):
    """(text states, region states, patch states or None) of a view's masked input: its regions'
    features zeroed and, on patches, the patches under them hidden (`zeroed_regions`)."""
    inputs = (view["input_ids"], view["text_mask"], input_features(view), view["locations"], view["region_mask"])
    if "pixels" not in view:  # regions: (text, regions), as every family's forward gives them
        return (*model(*inputs), None)
    return model.encode(*inputs, view["pixels"], view.get("zeroed_regions"))


def per_sample_mean(values, mask):
    """Mean of values over the masked positions of each sample: [B, N] -> [B]."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def gather_positions(states, positions):
    """states [B, N, D] at positions [B, P] (from `masking.label_positions`) -> [B, P, D]."""
    import torch
    return torch.gather(states, 1, positions.unsqueeze(-1).expand(-1, -1, states.shape[-1]))


def masked_token_losses(model, states, positions, targets):
    """Per-sample mean cross-entropy of the tied vocabulary head at the labelled positions only
    (`masking.label_positions`): the [*, vocab] logits are built for those positions, not all."""
    return per_sample_mean(token_ce(model.mlm_logits(gather_positions(states, positions)), targets),
                           targets != IGNORE)


def phrase_token_losses(model, states, positions, targets):
    """p-MRTC: each labelled position (a masked linked region) predicts every content sub-token
    of its phrase. targets [B, P, T] (IGNORE-padded): the loss of a position is the mean over its
    phrase's tokens of -log p(token), the cross-entropy against the uniform distribution over
    them, so "red sofa" asks the region for "red" and "sofa" alike; per sample, the mean over
    its labelled positions."""
    import torch
    log_probs = torch.log_softmax(model.mlm_logits(gather_positions(states, positions)).float(), dim=-1)
    valid = targets != IGNORE
    picked = torch.gather(log_probs, -1, targets.clamp(min=0)) * valid
    per_position = -picked.sum(-1) / valid.sum(-1).clamp(min=1)
    return per_sample_mean(per_position, valid.any(-1))


def token_ce(logits, labels):
    """Cross-entropy per position [B, N] (0 where the label is ignored)."""
    import torch.nn.functional as F
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="none").view(labels.shape)
