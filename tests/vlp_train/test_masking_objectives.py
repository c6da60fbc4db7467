"""Masking invariants, named per-sample losses, and the curriculum weighting."""
import math
import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertTokenizerFast

from vlp_train.config import ObjectiveConfig
from vlp_train.curriculum import combine, itm_weighting_on, sample_loss
from schemas.corpus import bundled_minilm_path, tag_query
from vlp_train.families.single_stream import FAMILY, SingleStreamModel
from vlp_train.masking import IGNORE, BatchBuilder, label_positions, locations
from vlp_train.objectives import input_features, per_sample_mean, token_ce
from vlp_train.step import to_device

OBJECTIVES = FAMILY.objectives

from .conftest import DIM, TAGS, make_sample


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast.from_pretrained(bundled_minilm_path())


@pytest.fixture(scope="module")
def samples():
    rng = random.Random(0)
    protos = np.random.default_rng(0).standard_normal((len(TAGS), DIM))
    out = []
    for i in range(12):
        meta, feats = make_sample(i, rng, protos)
        out.append({"key": f"k{i}", "meta": meta, "feats": feats})
    return out


@pytest.fixture(scope="module")
def builder(tokenizer):
    return BatchBuilder(tokenizer, {t: i for i, t in enumerate(sorted(TAGS))}, 40, 36, ObjectiveConfig())


def test_tag_query_and_locations():
    assert tag_query(["sofa", "woman", "sofa", "cup"], [0.5, 0.9, 0.7, 0.9]) == "cup woman sofa"
    np.testing.assert_allclose(locations(np.array([[0, 0, 50, 20]], np.float32), 100, 40), [[0, 0, 0.5, 0.5, 0.25]])


def linked_sample(i: int, phrases: list[tuple[str, list[str], int | None, float]], text: str,
                  tags=("person", "sofa", "dining table", "cup")) -> dict:
    """A sample of 4 regions whose one sentence has the given phrases: (phrase text, content words,
    linked region or None, similarity); region 3 ("cup") is linked by no phrase."""
    out = []
    for phrase, words, region, similarity in phrases:
        start = text.index(phrase)
        out.append({"text": phrase, "start": start, "end": start + len(phrase), "words": words, "region": region,
                    "tag": tags[region] if region is not None else None, "similarity": similarity})
    feats = np.random.default_rng(i).standard_normal((len(tags), DIM)).astype(np.float16)
    meta = {"schema_version": 1, "image_id": f"v{i}", "width": 200, "height": 100,
            "boxes": [[0, 0, 50, 50], [50, 0, 100, 50], [100, 0, 150, 50], [150, 0, 200, 50]], "tags": list(tags),
            "scores": [0.9, 0.8, 0.7, 0.6],
            "sentences": [{"sentence_id": f"s{i}", "text": text, "rank": 0, "score": 0.5, "phrases": out}]}
    return {"key": f"v{i}", "meta": meta, "feats": feats}


PARTLY_LINKED = ("A man sits on a red sofa near the window.",
                 [("A man", ["man"], 0, 0.7), ("a red sofa", ["red", "sofa"], 1, 0.9), ("the window", ["window"], None, 0.2)])
UNLINKED = ("Nothing here is about the picture at all.",
            [("Nothing", ["nothing"], None, 0.0), ("the picture", ["picture"], None, 0.3)])


def varied_samples() -> list[dict]:
    """Partly linked sentences (an unlinked phrase beside linked ones), sentences with no linked
    phrase, and a region ("cup") that no phrase links to."""
    return [linked_sample(i, *((PARTLY_LINKED[1], PARTLY_LINKED[0]) if i % 3 else (UNLINKED[1], UNLINKED[0])))
            for i in range(12)]


def test_region_phrase_masks_only_linked_items_one_modality_per_sample(builder):
    samples = varied_samples()
    sentences = [s["meta"]["sentences"][0] for s in samples]
    modalities = set()
    for seed in range(20):
        view = builder.region_phrase(samples, sentences, random.Random(seed))
        clean_feats = builder._regions(samples)[0]
        np.testing.assert_array_equal(view["features"].numpy(), clean_feats)  # one feature tensor: the clean one
        seen = input_features(view)  # what the model gets
        mrtc_at = {(i, int(view["mrtc_positions"][i, k])) for i in range(len(samples))
                   for k in range(view["mrtc_positions"].shape[1]) if (view["mrtc_targets"][i, k] != IGNORE).any()}
        for i, sentence in enumerate(sentences):
            linked = [p for p in sentence["phrases"] if p["region"] is not None]
            text_masked = (view["mlm_labels"][i] != IGNORE).any().item()
            zeroed = set(torch.nonzero(view["zeroed_regions"][i]).flatten().tolist())
            assert zeroed == {r for r in range(4) if seen[i, r].abs().sum() == 0}  # what the model saw zeroed
            assert zeroed == {r for (j, r) in mrtc_at if j == i}  # each masked region has its targets
            if not linked:  # nothing linked: the sample sits this task out
                assert not view["active"][i] and not text_masked and not zeroed
                continue
            assert view["active"][i] and text_masked != bool(zeroed)  # exactly one modality
            modalities.add("text" if text_masked else "regions")
            assert zeroed <= {p["region"] for p in linked}  # never region 3, linked to nothing
            enc = builder.tok(sentence["text"], return_offsets_mapping=True)
            for t in torch.nonzero(view["mlm_labels"][i] != IGNORE).flatten().tolist():
                start, end = enc["offset_mapping"][t]
                assert any(start < p["end"] and end > p["start"] for p in linked)  # never the unlinked "the window"
    assert modalities == {"text", "regions"}


def test_p_mrtc_targets_every_content_sub_token_of_the_phrase(builder):
    """A masked region linked to "a red sofa" predicts "red" and "sofa" (not "a"); one linked
    to a phrase whose word splits into word pieces predicts every piece."""
    samples = [linked_sample(0, [("a red sofa", ["red", "sofa"], 1, 0.99), ("The tablecloths", ["tablecloths"], 2, 0.99)],
                             "The tablecloths lie on a red sofa.")]
    pieces = builder.tok("tablecloths", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1  # the test needs a word of several pieces
    expected = {1: builder.tok("red sofa", add_special_tokens=False)["input_ids"], 2: pieces}
    seen = {}
    for seed in range(40):
        view = builder.region_phrase(samples, [samples[0]["meta"]["sentences"][0]], random.Random(seed))
        for k, region in enumerate(view["mrtc_positions"][0].tolist()):
            targets = [t for t in view["mrtc_targets"][0, k].tolist() if t != IGNORE]
            if targets:
                seen[region] = targets
    assert seen == expected


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_phrase_masking_frequency_follows_scale_times_similarity(builder, scale):
    """Each linked phrase (tokens or region) is masked with probability min(1, scale x similarity),
    and when none is drawn the most similar one is: over 3,000 draws each frequency is within 4
    standard errors of that."""
    similarities = [0.2, 0.4, 0.6, 0.8]
    phrases = [("the man", ["man"], 0, 0.2), ("a sofa", ["sofa"], 1, 0.4), ("a table", ["table"], 2, 0.6),
               ("one cup", ["cup"], 3, 0.8)]
    sample = linked_sample(0, phrases, "the man and a sofa by a table with one cup")
    sentence = sample["meta"]["sentences"][0]
    builder.obj.phrase_mask_scale = scale
    draws, counts = 3000, np.zeros(4)
    try:
        for seed in range(draws):
            view = builder.region_phrase([sample], [sentence], random.Random(seed))
            masked_tokens = set(torch.nonzero(view["mlm_labels"][0] != IGNORE).flatten().tolist())
            enc = builder.tok(sentence["text"], return_offsets_mapping=True)
            for n, p in enumerate(sentence["phrases"]):
                tokens = {t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < p["end"] and b > p["start"] and b > a}
                counts[n] += bool(tokens & masked_tokens) or bool(view["zeroed_regions"][0, p["region"]])
    finally:
        builder.obj.phrase_mask_scale = 1.0
    probabilities = np.minimum(1.0, scale * np.array(similarities))
    expected = probabilities.copy()
    expected[-1] += np.prod(1 - probabilities)  # none drawn: the most similar is masked
    error = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(counts / draws - expected) < 4 * error + 1e-9), (counts / draws, expected)


@pytest.mark.parametrize("mode", ["both", "one"])
def test_region_tag_masking_modes_and_whole_tags(tokenizer, mode):
    """`both` (the paper): every sample has tags and regions masked; `one`: exactly one modality.
    A multi-word tag ("dining table") is masked whole, never one of its words alone."""
    builder = BatchBuilder(tokenizer, {t: i for i, t in enumerate(["cup", "dining table", "person", "sofa"])}, 40, 36,
                           ObjectiveConfig(rt_masking=mode, mlm_prob=0.5))
    samples = [linked_sample(i, [], "x") for i in range(16)]
    table = tokenizer("dining table", add_special_tokens=False)["input_ids"]
    whole = 0
    for seed in range(10):
        view = builder.region_tag(samples, random.Random(seed))
        masked = view["zeroed_regions"]
        assert ((view["mrc_labels"] != IGNORE) == masked).all()
        for i in range(len(samples)):
            tags_masked, regions_masked = (view["mlm_labels"][i] != IGNORE).any().item(), masked[i].any().item()
            assert (tags_masked and regions_masked) if mode == "both" else (tags_masked != regions_masked)
            ids = view["input_ids"][i].tolist()
            labelled = view["mlm_labels"][i].tolist()
            start = next(t for t in range(len(ids) - 1) if [labelled[t] if labelled[t] != IGNORE else ids[t],
                                                             labelled[t + 1] if labelled[t + 1] != IGNORE else ids[t + 1]] == table)
            pair = [labelled[start] != IGNORE, labelled[start + 1] != IGNORE]
            assert pair[0] == pair[1]  # both words of the tag, or neither
            whole += pair[0]
    assert whole > 0


def test_region_tag_keeps_the_true_features_as_the_mrfr_target(builder, samples):
    view = builder.region_tag(samples, random.Random(2))
    clean = builder._regions(samples)[0]
    np.testing.assert_array_equal(view["features"].numpy(), clean)  # the target, shipped once
    masked = view["zeroed_regions"]
    assert masked.any()
    seen = input_features(view)
    assert (seen[masked] == 0).all() and (view["features"][masked] != 0).any()
    assert torch.equal(seen[~masked], view["features"][~masked])
    assert ((view["mrc_labels"] != IGNORE) == masked).all()


def test_random_replacement_draws_only_real_word_pieces(tokenizer):
    """The 10% random tokens of MLM: never [CLS], [SEP], [PAD], [MASK], [UNK] or an [unused*] slot
    (about 1,000 of BERT's 30,522 ids)."""
    builder = BatchBuilder(tokenizer, {}, 40, 36, ObjectiveConfig())
    vocab = len(tokenizer)
    ids = np.full((1, 4000), tokenizer.convert_tokens_to_ids("the"), np.int64)
    labels = np.full(ids.shape, IGNORE, np.int64)
    builder._mask_tokens(ids, labels, 0, range(ids.shape[1]), random.Random(0))
    replaced = [int(t) for t in ids[0] if t not in (tokenizer.mask_token_id, tokenizer.convert_tokens_to_ids("the"))]
    assert len(replaced) > 300
    tokens = tokenizer.convert_ids_to_tokens(replaced)
    assert not [t for t in tokens if t.startswith("[") and t.endswith("]")], tokens
    assert all(0 <= t < vocab for t in replaced)


def test_image_sentence_negatives_come_from_other_images(builder, samples):
    sentences = [s["meta"]["sentences"][0] for s in samples]
    view = builder.image_sentence(samples, sentences, random.Random(3))
    labels = view["itm_labels"]
    assert 0 < labels.sum() < len(samples)
    for i in range(len(samples)):
        text = builder.tok.decode(view["clean_ids"][i], skip_special_tokens=True)
        assert text == sentences[i]["text"].lower()
        if labels[i] == 0:
            assert (view["mlm_labels"][i] == IGNORE).all()  # no MLM on mismatched pairs
            assert not torch.equal(view["input_ids"][i][: view["text_mask"][i].sum()],
                                   view["clean_ids"][i][: view["clean_text_mask"][i].sum()])
            negative = builder.tok.decode(view["input_ids"][i], skip_special_tokens=True)
            assert all(negative != s["text"].lower() for s in samples[i]["meta"]["sentences"])


def test_itm_label_is_not_given_away_by_the_masking(builder, samples):
    """ITM and MLM share the image-sentence forward: mismatched pairs must carry [MASK] tokens as
    often as matched ones, or "[MASK] present" alone predicts the label."""
    masked_share = {0: [], 1: []}
    for seed in range(40):
        sentences = [random.Random(seed).choice(s["meta"]["sentences"]) for s in samples]
        view = builder.image_sentence(samples, sentences, random.Random(seed))
        has_mask = (view["input_ids"] == builder.mask_id).any(dim=1)
        for label, masked in zip(view["itm_labels"].tolist(), has_mask.tolist()):
            masked_share[label].append(masked)
    negatives, positives = np.mean(masked_share[0]), np.mean(masked_share[1])
    assert len(masked_share[0]) >= 100 and len(masked_share[1]) >= 100
    assert abs(negatives - positives) < 0.1, (negatives, positives)  # was 0 vs ~0.97


def test_a_negative_is_none_of_the_images_retrieved_sentences(builder, samples):
    """With K sentences per image, another image's pick may be one of this image's K: not a negative."""
    shared = dict(samples[1]["meta"]["sentences"][0])  # image 0 also retrieved image 1's sentence
    crowded = [dict(samples[0], meta={**samples[0]["meta"], "sentences": samples[0]["meta"]["sentences"] + [shared]}),
               samples[1]]
    sentences = [crowded[0]["meta"]["sentences"][0], shared]
    labels = [builder.image_sentence(crowded, sentences, random.Random(seed))["itm_labels"][0].item()
              for seed in range(30)]
    assert labels == [1] * 30  # image 0's only possible negative is a sentence it retrieved


def test_batches_are_reproducible_from_their_seed(builder, samples):
    a = builder.build(samples, ["rt", "rp", "is"], random.Random(7))
    b = builder.build(samples, ["rt", "rp", "is"], random.Random(7))
    for task in a:
        for k, v in a[task].items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[task][k]), (task, k)


def test_per_sample_losses_on_hand_made_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    assert per_sample_mean(values, mask).tolist() == [2.0, 0.0]
    logits = torch.zeros(1, 2, 5)
    labels = torch.tensor([[3, IGNORE]])
    assert token_ce(logits, labels)[0].tolist() == pytest.approx([math.log(5), 0.0])


def _tiny_model():
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    return SingleStreamModel(config, DIM, TAGS).eval()


def test_label_positions_and_losses_at_them_equal_the_full_computation(builder, samples):
    labels = np.array([[IGNORE, 5, IGNORE, 7], [IGNORE] * 4, [1, IGNORE, IGNORE, IGNORE]])
    positions, targets = label_positions(labels)
    assert positions.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert targets.tolist() == [[5, 7], [IGNORE, IGNORE], [1, IGNORE]]
    positions, targets = label_positions(labels[1:])  # at most one label a row: still 2 wide
    assert positions.tolist() == [[0, 0], [0, 0]] and targets.tolist() == [[IGNORE, IGNORE], [1, IGNORE]]
    model = _tiny_model()
    views = to_device(builder.build(samples[:6], ["rt", "rp", "is"], random.Random(5)), torch.device("cpu"))
    for task in ("rt", "rp", "is"):
        view = views[task]
        named, out = OBJECTIVES[task](model, view)
        full = view["mlm_labels"]
        expected = per_sample_mean(token_ce(model.mlm_logits(out["text"]), full), full != IGNORE)
        assert torch.allclose(named["mlm"], expected, atol=1e-6), task
    # p-MRTC by hand: per masked region, the mean over its phrase's tokens of -log p(token)
    # (phrases of one and of two word pieces: "a man", "a red sofa")
    varied = varied_samples()
    view = to_device(builder.build(varied, ["rp"], random.Random(5)), torch.device("cpu"))["rp"]
    assert ((view["mrtc_targets"] != IGNORE).sum(-1) == 2).any()
    named, out = OBJECTIVES["rp"](model, view)
    log_probs = torch.log_softmax(model.mlm_logits(out["regions"]), -1)
    for i in range(len(view["active"])):
        per_region = [-log_probs[i, r, [t for t in targets.tolist() if t != IGNORE]].mean()
                      for r, targets in zip(view["mrtc_positions"][i].tolist(), view["mrtc_targets"][i])
                      if (targets != IGNORE).any()]
        expected = torch.stack(per_region).mean() if per_region else torch.tensor(0.0)
        torch.testing.assert_close(named["mrtc"][i], expected, rtol=1e-5, atol=1e-5)
    assert (named["mrtc"] > 0).any()


def test_each_objective_returns_named_per_sample_losses(builder, samples):
    model = _tiny_model()
    views = to_device(builder.build(samples[:5], ["rt", "rp", "is"], random.Random(4)), torch.device("cpu"))
    expected = {"rt": {"mlm", "mrc", "mrfr"}, "rp": {"mlm", "mrtc"}, "is": {"itm", "mlm"}}
    for task, view in views.items():
        named, _ = OBJECTIVES[task](model, view)
        assert set(named) == expected[task]
        assert all(v.shape == (5,) and torch.isfinite(v).all() for v in named.values())
    # the ITM loss is the cross-entropy of the ITM head on [CLS]
    view = views["is"]
    named, out = OBJECTIVES["is"](model, view)
    manual = torch.nn.functional.cross_entropy(out["itm_logits"], view["itm_labels"], reduction="none")
    assert torch.allclose(named["itm"], manual)
    # MRFR: squared error to the original features at the masked regions only
    named, out = OBJECTIVES["rt"](model, views["rt"])
    rt = views["rt"]
    i = int(torch.nonzero(rt["zeroed_regions"].any(1))[0])
    sq = (model.mrfr(out["regions"][i]) - rt["features"][i]).pow(2).mean(-1)
    assert torch.allclose(named["mrfr"][i], sq[rt["zeroed_regions"][i]].mean())
    # ...and the model saw those regions zeroed, never the target (rt and rp)
    for task in ("rt", "rp"):
        view = views[task]
        zeroed_by_hand = view["features"].clone()
        zeroed_by_hand[view["zeroed_regions"]] = 0
        _, out = OBJECTIVES[task](model, view)
        _, regions = model(view["input_ids"], view["text_mask"], zeroed_by_hand, view["locations"], view["region_mask"])
        torch.testing.assert_close(out["regions"], regions)
        _, unmasked = model(view["input_ids"], view["text_mask"], view["features"], view["locations"], view["region_mask"])
        assert not torch.allclose(out["regions"], unmasked)


def test_curriculum_weights_each_sample_and_only_from_epoch_m():
    objectives = ObjectiveConfig(itm_weight_from_epoch=1)
    assert not itm_weighting_on(0, objectives) and itm_weighting_on(1, objectives) and itm_weighting_on(3, objectives)
    assert not itm_weighting_on(5, ObjectiveConfig(itm_weighting=False))
    rp = torch.tensor([2.0, 4.0])
    rt = torch.tensor([1.0, 3.0])
    active = torch.tensor([True, True])
    weights = {"rp": torch.tensor([0.9, 0.1])}
    loss = combine({"rt": rt, "rp": rp}, {"rt": active, "rp": active}, weights)
    # rt unweighted mean (2.0) + per-sample weighted rp mean ((0.9*2 + 0.1*4) / 2 = 1.1)
    assert loss.item() == pytest.approx(2.0 + 1.1)
    unweighted = combine({"rt": rt, "rp": rp}, {"rt": active, "rp": active}, {})
    assert unweighted.item() == pytest.approx(2.0 + 3.0)
    # a batch-mean weight would give (0.5 * 3.0): the per-sample result differs
    assert loss.item() != pytest.approx(2.0 + 0.5 * 3.0)
    assert sample_loss({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, 0.5])}).tolist() == [1.5, 2.5]
    inactive = combine({"rp": rp}, {"rp": torch.tensor([True, False])}, {})
    assert inactive.item() == pytest.approx(2.0)


def test_direct_tokenizing_equals_the_hf_call(builder, tokenizer):
    """The loader calls the Rust tokenizer directly; same ids, mask and offsets as the HF call,
    for truncated, accented, empty and whitespace-only texts."""
    texts = ["A woman sits on a red sofa.", "word " * 60, "Café crème, naïve façade — 東京", "", "   ",
             "unbelievably tokenizable supercalifragilistic words"]
    ids, mask, offsets = builder._tokenize(texts)
    hf = tokenizer(texts, truncation=True, max_length=40, padding="longest", return_offsets_mapping=True,
                   return_tensors="np")
    assert ids.shape == (len(texts), 40) and ids.dtype == np.int64 and mask.dtype == bool
    np.testing.assert_array_equal(ids, hf["input_ids"])
    np.testing.assert_array_equal(mask, hf["attention_mask"].astype(bool))
    np.testing.assert_array_equal(offsets, hf["offset_mapping"])
    short_ids, _, short_offsets = builder._tokenize(["a cat"])
    assert short_ids.shape == (1, 4) and short_offsets.shape == (1, 4, 2)  # padded to the longest only
