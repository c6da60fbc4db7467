"""ITC over the global batch and ITM hard negatives (vlp_train/objectives/contrastive.py)."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp_train.objectives.contrastive import LOGIT_SCALE_INIT, hard_negatives, itc_losses

from .test_distributed import _run_ranks


def _features(n: int, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_itc_is_the_two_way_softmax_cross_entropy_with_a_learnable_temperature():
    images, texts = _features(5)
    log_scale = torch.tensor(LOGIT_SCALE_INIT, requires_grad=True)
    contrast = itc_losses(images, texts, log_scale)
    logits = images @ texts.T / 0.07
    expected = (F.cross_entropy(logits, torch.arange(5), reduction="none")
                + F.cross_entropy(logits.T, torch.arange(5), reduction="none")) / 2
    torch.testing.assert_close(contrast.losses, expected, rtol=1e-5, atol=1e-5)
    contrast.losses.mean().backward()
    assert log_scale.grad is not None and log_scale.grad != 0  # the temperature learns


def test_soft_targets_at_alpha_zero_are_plain_itc_and_at_one_are_the_soft_cross_entropy():
    images, texts = _features(4)
    log_scale = torch.tensor(LOGIT_SCALE_INIT)
    soft = (torch.softmax(torch.randn(4, 4), 1), torch.softmax(torch.randn(4, 4), 1))
    plain = itc_losses(images, texts, log_scale).losses
    torch.testing.assert_close(itc_losses(images, texts, log_scale, soft_targets=soft, alpha=0.0).losses, plain)
    logits = images @ texts.T / 0.07
    distilled = -((soft[0] * F.log_softmax(logits, 1)).sum(1) + (soft[1] * F.log_softmax(logits.T, 1)).sum(1)) / 2
    torch.testing.assert_close(itc_losses(images, texts, log_scale, soft_targets=soft, alpha=1.0).losses, distilled,
                               rtol=1e-5, atol=1e-5)


def test_columns_of_the_same_text_share_the_target():
    images, texts = _features(3)
    texts = torch.stack([texts[0], texts[0], texts[2]])  # samples 0 and 1 retrieved the same sentence
    contrast = itc_losses(images, texts, torch.tensor(LOGIT_SCALE_INIT), text_keys=torch.tensor([7, 7, 9]))
    logits = images @ texts.T / 0.07
    target = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    expected = -((target * F.log_softmax(logits, 1)).sum(1) + (target * F.log_softmax(logits.T, 1)).sum(1)) / 2
    torch.testing.assert_close(contrast.losses, expected, rtol=1e-5, atol=1e-5)


ROWS = (3, 2)  # two ranks of different batch sizes (an epoch's partial last batch)


def _itc_rank(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        images, texts = _features(sum(ROWS))
        keys = torch.tensor([1, 2, 1, 3, 4])
        local = slice(sum(ROWS[:rank]), sum(ROWS[:rank + 1]))
        images, texts = images[local].clone().requires_grad_(), texts[local].clone().requires_grad_()
        contrast = itc_losses(images, texts, torch.tensor(LOGIT_SCALE_INIT), text_keys=keys[local])
        contrast.losses.sum().backward()
        results[rank] = (contrast.losses.detach(), images.grad, texts.grad, contrast.offset,
                         contrast.image_to_text.shape)
    finally:
        dist.destroy_process_group()


def test_itc_gathered_over_two_ranks_is_the_loss_and_gradient_of_the_joined_batch():
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        _run_ranks(_itc_rank, results, timeout=60)
        results = dict(results)
    images, texts = _features(sum(ROWS))
    images.requires_grad_(), texts.requires_grad_()
    joined = itc_losses(images, texts, torch.tensor(LOGIT_SCALE_INIT), text_keys=torch.tensor([1, 2, 1, 3, 4]))
    joined.losses.sum().backward()
    assert [results[r][3] for r in (0, 1)] == [0, 3]
    assert [tuple(results[r][4]) for r in (0, 1)] == [(3, 5), (2, 5)]  # local rows x global columns
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), joined.losses.detach())
    # each rank's gradient includes what the other rank's rows send back to its columns
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), images.grad)
    torch.testing.assert_close(torch.cat([results[0][2], results[1][2]]), texts.grad)


def test_hard_negatives_follow_the_similarity_softmax_and_never_draw_the_positive():
    images, texts = _features(4, seed=3)
    keys = torch.tensor([0, 1, 2, 1])  # samples 1 and 3 share a text: never each other's negative
    contrast = itc_losses(images, texts, torch.tensor(1.0), text_keys=keys)  # scale e^1: a spread distribution
    draws, g = 4000, torch.Generator().manual_seed(0)
    counts_t = torch.zeros(4, 4)
    counts_i = torch.zeros(4, 4)
    for _ in range(draws):
        neg_text, neg_image, valid = hard_negatives(contrast, keys, generator=g)
        counts_t[torch.arange(4), neg_text] += 1
        counts_i[torch.arange(4), neg_image] += 1
    assert valid.all()
    excluded = (keys[:, None] == keys[None, :])
    assert counts_t[excluded].sum() == 0 and counts_i[excluded].sum() == 0
    for counts, similarities in ((counts_t, contrast.image_to_text), (counts_i, contrast.text_to_image)):
        expected = torch.softmax(similarities, 1).masked_fill(excluded, 0)
        expected = expected / expected.sum(1, keepdim=True)
        torch.testing.assert_close(counts / draws, expected, atol=0.03, rtol=0)


def test_a_sample_whose_every_other_text_is_its_own_has_no_negative():
    images, texts = _features(3)
    keys = torch.tensor([5, 5, 5])
    contrast = itc_losses(images, texts, torch.tensor(LOGIT_SCALE_INIT), text_keys=keys)
    _, _, valid = hard_negatives(contrast, keys)
    assert not valid.any()


def test_a_text_an_image_retrieved_is_its_positive_both_ways_and_never_its_negative():
    from vlp_train.objectives.contrastive import NO_KEY
    images, texts = _features(4, seed=5)
    text_keys = torch.tensor([10, 11, 12, 13])
    # image 0 also retrieved sample 2's sentence; the others only their own
    image_keys = torch.tensor([[10, 12], [11, NO_KEY], [12, NO_KEY], [13, NO_KEY]])
    contrast = itc_losses(images, texts, torch.tensor(1.0), text_keys=text_keys, image_keys=image_keys)
    logits = images @ texts.T * torch.e
    i2t = torch.eye(4)
    i2t[0] = torch.tensor([0.5, 0, 0.5, 0])
    t2i = torch.eye(4)
    t2i[2] = torch.tensor([0.5, 0, 0.5, 0])  # text 2 belongs to image 2 and to image 0
    expected = -((i2t * F.log_softmax(logits, 1)).sum(1) + (t2i * F.log_softmax(logits.T, 1)).sum(1)) / 2
    torch.testing.assert_close(contrast.losses, expected, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        neg_text, neg_image, valid = hard_negatives(contrast, generator=g)
        assert valid.all() and neg_text[0] not in (0, 2) and neg_image[2] not in (0, 2)
        assert (neg_text != torch.arange(4)).all() and (neg_image != torch.arange(4)).all()


def test_itm_scores_each_samples_pair_and_its_two_hard_negatives_or_its_pair_alone():
    """The three-pair ITM both VLMo and VLMAE train (itm_with_hard_negatives): each sample's own pair
    is a match, its text with the drawn negative image and its image with the drawn negative text
    are mismatches; a sample with nothing to draw (every other text its own) keeps its pair only."""
    from vlp_train.objectives.contrastive import itm_with_hard_negatives
    images, texts = _features(4, seed=7)
    keys = torch.tensor([0, 1, 2, 2])  # samples 2 and 3 share a text
    contrast = itc_losses(images, texts, torch.tensor(1.0), text_keys=keys)
    pair_score = torch.randn(4, 4, 2, generator=torch.Generator().manual_seed(1))  # logits of (text i, image j)
    seen = []

    def pair_logits(text_rows, image_rows):
        seen.append((text_rows, image_rows))
        return pair_score[text_rows, image_rows]
    losses, logits = itm_with_hard_negatives(contrast, keys, pair_logits, generator=torch.Generator().manual_seed(2))
    text_rows, image_rows = seen[0]
    own = torch.arange(4)
    neg_text, neg_image, valid = hard_negatives(contrast, keys, generator=torch.Generator().manual_seed(2))
    assert valid.all()
    assert torch.equal(text_rows, torch.cat([own, own, neg_text])) and torch.equal(image_rows, torch.cat([own, neg_image, own]))
    assert not (keys[neg_text] == keys).any() and not (keys[neg_image] == keys).any()
    ce = lambda logit, label: F.cross_entropy(logit[None], torch.tensor([label]))  # noqa: E731
    expected = torch.stack([(ce(pair_score[i, i], 1) + ce(pair_score[i, neg_image[i]], 0)
                             + ce(pair_score[neg_text[i], i], 0)) / 3 for i in range(4)])
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(logits[:4], pair_score[own, own])

    same = torch.tensor([5, 5, 5, 5])  # every text the same: no negative anywhere, the pair's loss alone
    contrast = itc_losses(images, texts, torch.tensor(1.0), text_keys=same)
    losses, _ = itm_with_hard_negatives(contrast, same, pair_logits)
    torch.testing.assert_close(losses, torch.stack([ce(pair_score[i, i], 1) for i in range(4)]))
