"""Retrieval as a dual encoder (VLMo's fine-tuning): the families' dual-encoder interface, the ITC
fine-tuning loss, dual-encoder ranking of a split, and the classification tasks still on the
fusion [T_CLS]."""
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from vlp_train.families import FAMILIES
from vlp_train.families.vlmo import IMAGE, TEXT, VLMoModel
from vlp_train.finetune.config import load_config

from .test_harness import write_karpathy


def small_vlmo(layers=2, vl_layers=1) -> VLMoModel:
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return VLMoModel(config, feature_dim=6, tags=["cat"], vl_layers=vl_layers).eval()


def test_the_dual_encoder_is_the_projected_cls_of_the_one_modality_passes():
    """embed_images / embed_texts: the image alone through the V-FFN and the text alone through the
    L-FFN in every layer, [CLS] -> projection -> L2; the families that have one say so."""
    assert {name for name, f in FAMILIES.items() if f.dual_encoder} == {"vlmo", "vlmae"}
    model = small_vlmo()
    modes = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, args, out: modes.append(args[2]))
    ids, text_mask = torch.randint(5, 100, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    features, locations, region_mask = torch.randn(3, 2, 6), torch.rand(3, 2, 5), torch.ones(3, 2, dtype=torch.bool)
    images = model.embed_images(features, locations, region_mask)
    assert modes == [IMAGE, IMAGE]
    modes.clear()
    texts = model.embed_texts(ids, text_mask)
    assert modes == [TEXT, TEXT]
    expected = F.normalize(model.image_proj(model.encode_image(features, locations, region_mask)[:, 0]), dim=-1)
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
    assert model.contrast_log_scale is model.logit_scale


def test_vlmaes_dual_encoder_is_its_online_encoders_over_the_whole_image():
    from vlp_train.families.vlmae import VLMAEModel
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = VLMAEModel(config, {"feature_dim": 6, "tags": ["cat"], "fusion_layers": 1, "vision": [1, 16, 2],
                                "decoder": [1, 16, 2]}).eval()
    features, locations, region_mask = torch.randn(3, 2, 6), torch.rand(3, 2, 5), torch.ones(3, 2, dtype=torch.bool)
    view = {"features": features, "locations": locations, "region_mask": region_mask}
    expected = F.normalize(model.vision_proj(model.vision(view)[0][:, 0]), dim=-1)
    torch.testing.assert_close(model.embed_images(features, locations, region_mask), expected)
    ids, text_mask = torch.randint(5, 100, (3, 4)), torch.ones(3, 4, dtype=torch.bool)
    assert model.embed_texts(ids, text_mask).shape == (3, VLMAEModel.CONTRAST_DIM)
    assert model.contrast_log_scale is model.itc_log_scale


# vlmo-debug's model: the bundled MiniLM as a multiway transformer (a random init's [CLS] states
# hardly differ between inputs, so a dual encoder from one has nothing to rank by)
VLMO_DEBUG = ["model.arch=vlmo", "model.vl_layers=2", "model.dropout=0.0", "run.log_every=1"]


def vlmo_retrieval(tmp_path, *more):
    detections = write_karpathy(tmp_path)
    cfg = load_config("retrieval", VLMO_DEBUG + ["data.batch_size=4", "data.eval_split=test", *more])
    cfg.run.output, cfg.data.detections, cfg.data.data = str(tmp_path / "ft"), detections, str(tmp_path)
    return cfg


def test_retrieval_objective_follows_the_family_and_is_validated(tmp_path):
    from vlp_train.finetune.config import validate
    from vlp_train.finetune.tasks import task_for

    assert task_for("retrieval", "auto", dual_encoder=True).dual_encoder
    assert task_for("retrieval", "itc", dual_encoder=True).dual_encoder
    assert task_for("retrieval", "itm", dual_encoder=True).pairs is not None      # the fusion ITM, by choice
    assert task_for("retrieval", "auto", dual_encoder=False).pairs is not None    # single-stream: no dual encoder
    assert not task_for("vqa", "itc", dual_encoder=True).dual_encoder             # a retrieval key only
    with pytest.raises(ValueError, match="no dual encoder"):
        task_for("retrieval", "itc", dual_encoder=False)
    with pytest.raises(ValueError, match="task.retrieval_objective"):
        validate(load_config("retrieval", ["task.retrieval_objective=contrast"]))
    with pytest.raises(ValueError, match="task.rerank_k"):
        validate(load_config("retrieval", ["task.rerank_k=-1"]))


def test_a_retrieval_run_saved_before_the_objective_key_resumes_by_itm():
    """A checkpoint's config from before task.retrieval_objective trained by ITM; read as `auto` it
    would switch a VLMo/VLMAE run to ITC mid-way. A config that names the key keeps it."""
    from vlp_train.config import TrainConfig
    from vlp_train.finetune.config import FinetuneConfig

    saved = load_config("retrieval", VLMO_DEBUG).to_dict()
    assert saved["task"]["retrieval_objective"] == "auto"
    assert FinetuneConfig.from_dict(saved).task.retrieval_objective == "auto"
    del saved["task"]["retrieval_objective"]
    assert FinetuneConfig.from_dict(saved).task.retrieval_objective == "itm"
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_itc_fine_tuning_loss_is_the_contrast_over_the_batch_by_hand(tmp_path):
    """A batch of 3 captions, two of one image: each caption's loss is the mean of its image's
    softmax over the batch's texts and its text's softmax over the batch's images (scaled dot
    products of the projected [CLS] states), the target spread over the columns of the same image."""
    import math

    from vlp_train.finetune.data import Collate
    from vlp_train.finetune.tasks import task_of
    from vlp_train.finetune.train import build_finetune, describe_finetune
    from vlp_train.step import to_device

    run = build_finetune(vlmo_retrieval(tmp_path))
    assert run.task.dual_encoder and run.model.head is None
    # what the run learns, said instead of "0 labels": the contrast over the 4 training images
    assert re.fullmatch(r"fine-tuning \S+ on retrieval: 8 train / 8 test examples, ITC over 4 images, \d+ steps",
                        describe_finetune(run))
    assert task_of("refcoco+").outputs([], []) == "a score per detected region"  # the other task without labels
    assert task_of("retrieval").outputs(["no", "match"], examples=[]) == "2 labels"  # ITM's
    run.model.eval()
    examples = run.train.examples
    picked = [0, 1, 2]  # captions 0 and 1 are of image 0, caption 2 of image 1
    assert examples[0].image_ids == examples[1].image_ids != examples[2].image_ids
    batch = Collate(run.train, run.builder, {})(picked)
    inputs = to_device({"x": batch["inputs"]}, run.device)["x"]
    with torch.no_grad():
        run.model.model.logit_scale.fill_(math.log(5.0))
        outputs = run.model(inputs)
        losses = run.task.sample_loss(outputs, batch["targets"])
        m = run.model.model
        image = F.normalize(m.image_proj(m.encode_image(inputs["features"], inputs["locations"],
                                                       inputs["region_mask"])[:, 0]), dim=-1)
        text = F.normalize(m.text_proj(m.encode_text(inputs["input_ids"], inputs["text_mask"])[:, 0]), dim=-1)
    same = [[examples[i].image_ids == examples[j].image_ids for j in picked] for i in picked]
    for i in range(3):
        i2t = [5.0 * float(image[i] @ text[j]) for j in range(3)]
        t2i = [5.0 * float(text[i] @ image[j]) for j in range(3)]
        positives = [j for j in range(3) if same[i][j]]

        def cross_entropy(logits):
            log_total = math.log(sum(math.exp(v) for v in logits))
            return -sum(logits[j] - log_total for j in positives) / len(positives)
        assert float(losses[i]) == pytest.approx((cross_entropy(i2t) + cross_entropy(t2i)) / 2, rel=1e-4)
    assert len(positives) == 1 and sum(same[0]) == 2  # caption 0's image has two positive texts


@pytest.mark.slow
def test_itc_fine_tuning_lowers_the_loss_and_ranks_by_the_dual_encoder(tmp_path):
    """A few epochs of ITC lower the loss; evaluation's R@K come from the dot products of the
    saved model's projected features over the whole split, as a direct computation gives them."""
    import json

    from vlp_train import pretrained
    from vlp_train.finetune.metrics import retrieval_index, retrieval_recalls
    from contextlib import nullcontext

    from vlp_train.finetune.train import evaluate, finetune, load_finetuned
    from vlp_train.step import to_device

    cfg = vlmo_retrieval(tmp_path, "optim.epochs=3", "optim.lr=1e-4", "optim.warmup_ratio=0")
    summary = finetune(cfg)
    assert summary["steps"] == 6  # 8 captions / 4 a batch x 3 epochs
    rows = [json.loads(line) for line in open(tmp_path / "ft" / "log.jsonl")]
    losses = [r["retrieval/loss"] for r in rows if "retrieval/loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) < 0.6 * sum(losses[:2]), losses
    saved = json.load(open(tmp_path / "ft" / "best" / "task.json"))
    assert saved["dual_encoder"] is True
    result = evaluate("retrieval", str(tmp_path / "ft"), str(tmp_path), "test", cfg.data.detections)
    assert result["examples"] == 8 and result["rmean"] == pytest.approx(summary["best"]["metrics"]["rmean"])

    # the same figures from the saved model's features, computed here
    from vlp_train.finetune.data import SplitData
    from vlp_train.finetune.regions import DetectionIndex
    from vlp_train.finetune.tasks import task_for
    from vlp_train.finetune.train import make_builder, read_split
    from transformers import BertTokenizerFast
    model = pretrained.load(str(tmp_path / "ft" / "best")).eval()
    task = task_for("retrieval", "itc", True)
    data = SplitData(task, read_split(task, cfg, "test"), DetectionIndex(cfg.data.detections), cfg.model.max_regions)
    builder = make_builder(BertTokenizerFast.from_pretrained(str(tmp_path / "ft" / "best")), cfg, data.feature_dim)
    images, text_image = retrieval_index(data.examples)
    feats, locs, region_mask, _ = builder._regions([data.regions[k].sample() for k in images])
    ids, text_mask, _ = builder._tokenize([e.text for e in data.examples])
    x = to_device({"x": builder._tensors(input_ids=ids, text_mask=text_mask, features=feats, locations=locs,
                                         region_mask=region_mask)}, torch.device("cpu"))["x"]
    with torch.no_grad():
        image = model.embed_images(x["features"], x["locations"], x["region_mask"])
        text = model.embed_texts(x["input_ids"], x["text_mask"])
    direct = retrieval_recalls((image @ text.T).numpy(), text_image)
    assert {k: result[k] for k in direct} == pytest.approx(direct)
    # ITM re-scoring each query's top k of the dual encoder: k = 4 is every image of a caption, so
    # each caption's top image is the fusion ITM's choice among all
    reranked = evaluate("retrieval", str(tmp_path / "ft"), str(tmp_path), "test", cfg.data.detections, rerank_k=4)
    assert reranked["rerank_k"] == 4 and {"tr@1", "ir@1", "rmean"} <= set(reranked)
    finetuned = load_finetuned(str(tmp_path / "ft"), torch.device("cpu"))
    task_model, task = finetuned.model, finetuned.task
    cfg.task.rerank_k = 4
    _, top_image = task.predict(task_model, data, builder, cfg, torch.device("cpu"), nullcontext())
    with torch.no_grad():
        rows = torch.arange(len(images)).repeat_interleave(len(text))
        columns = torch.arange(len(text)).repeat(len(images))
        fused, _ = model(x["input_ids"][columns], x["text_mask"][columns], x["features"][rows], x["locations"][rows],
                         x["region_mask"][rows])
        logits = model.itm_logits(fused).float()
    itm = (logits[:, 1] - logits[:, 0]).view(len(images), len(text))
    assert top_image == {e.example_id: images[int(itm[:, t].argmax())] for t, e in enumerate(data.examples)}


def test_classification_tasks_read_the_fusion_t_cls(tmp_path):
    """A VLMo fine-tuned for a classification task: the head reads the pair's fusion pass ([T_CLS]
    after the VL-FFN layers), not the dual encoder."""
    from vlp_train.families.vlmo import PAIR
    from vlp_train.finetune.train import TaskModel

    model = small_vlmo()
    modes = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, args, out: modes.append(args[2]))
    task_model = TaskModel(model, torch.nn.Identity()).eval()
    ids, text_mask = torch.randint(5, 100, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    inputs = {"input_ids": ids, "text_mask": text_mask, "features": torch.randn(3, 2, 6),
              "locations": torch.rand(3, 2, 5), "region_mask": torch.ones(3, 2, dtype=torch.bool)}
    with torch.no_grad():
        pooled = task_model(inputs)
        fused, _ = model(ids, text_mask, inputs["features"], inputs["locations"], inputs["region_mask"])
    assert modes[:2] == [PAIR, PAIR]
    torch.testing.assert_close(pooled, fused[:, 0])


def test_itm_reranking_scores_each_distinct_pair_once(tmp_path):
    """--rerank-k: each image's top k captions and each caption's top k images are re-scored by the
    fusion ITM, a pair in both lists once (before: once per direction, 24 scorings here); the
    recalls are those of each direction re-scored apart (evaluate_vlmo.rerank_scores)."""
    from contextlib import nullcontext

    from vlp_train.evaluate_vlmo import rerank_scores
    from vlp_train.finetune.metrics import retrieval_index, retrieval_recalls
    from vlp_train.finetune.train import build_finetune
    from vlp_train.step import to_device

    run = build_finetune(vlmo_retrieval(tmp_path))
    run.model.eval()
    encoder, data, k = run.model.model, run.val, 2
    images, text_image = retrieval_index(data.examples)
    with torch.no_grad():
        x = to_device({"x": data.inputs(run.builder, None, images)}, run.device)["x"]
        t = to_device({"x": data.inputs(run.builder, [e.text for e in data.examples], None)}, run.device)["x"]
        scores = (encoder.embed_images(x["features"], x["locations"], x["region_mask"])
                  @ encoder.embed_texts(t["input_ids"], t["text_mask"]).T).float()  # [images, texts]
    distinct = ({(i, int(c)) for i in range(len(images)) for c in scores[i].topk(k).indices}
                | {(int(i), c) for c in range(len(data.examples)) for i in scores[:, c].topk(k).indices})
    assert len(distinct) < k * (len(images) + len(data.examples))  # the directions' lists overlap here

    scored = []
    itm_logits = encoder.itm_logits

    def counting(states):  # the scorer, wrapped: rows scored
        scored.append(states.shape[0])
        return itm_logits(states)
    encoder.itm_logits = counting
    run.cfg.task.rerank_k = k
    metrics, _ = run.task.predict(run.model, data, run.builder, run.cfg, run.device, nullcontext())
    del encoder.itm_logits
    assert sum(scored) == len(distinct)

    def pair_of(image_rows, text_rows):
        return (t["input_ids"][text_rows], t["text_mask"][text_rows], x["features"][image_rows],
                x["locations"][image_rows], x["region_mask"][image_rows], None)
    with torch.no_grad():
        image_to_text = rerank_scores(encoder, scores, k, pair_of, 64, nullcontext())
        text_to_image = rerank_scores(encoder, scores.T, k, lambda q, c: pair_of(c, q), 64, nullcontext())
    apart = retrieval_recalls(image_to_text.numpy(), text_image, image_scores=text_to_image.T.numpy())
    assert metrics == pytest.approx({**apart, "rerank_k": k})


def test_rerank_retrieval_pads_batches_of_different_widths_and_scores_each_pair_as_alone():
    """evaluate_vlmo.rerank_retrieval, the one re-ranking of held-out evaluation and of fine-tuned
    retrieval (--rerank-k): texts and images come in batches of different widths (fine-tuning's
    host batches, float16 region features as they travel); each re-scored pair's ITM score is that
    of the pair alone, unpadded, and the other scores keep the dual encoder's."""
    from contextlib import nullcontext

    from vlp_train.evaluate_vlmo import rerank_both, rerank_retrieval

    model = small_vlmo()
    torch.manual_seed(1)
    text_mask = torch.ones(3, 6, dtype=torch.bool)
    text_mask[2, 4:] = False                      # padded inside its own batch too
    texts = [{"input_ids": torch.randint(5, 100, (2, 4)), "text_mask": torch.ones(2, 4, dtype=torch.bool)},
             {"input_ids": torch.randint(5, 100, (3, 6)), "text_mask": text_mask}]
    images = [{"features": torch.randn(3, 2, 6).half(), "locations": torch.rand(3, 2, 5),
               "region_mask": torch.ones(3, 2, dtype=torch.bool)},
              {"features": torch.randn(1, 4, 6).half(), "locations": torch.rand(1, 4, 5),
               "region_mask": torch.ones(1, 4, dtype=torch.bool)}]
    scores = torch.randn(4, 5)                      # [images, texts]
    reranked = rerank_retrieval(model, scores, 2, texts, images, 3, nullcontext(), torch.device("cpu"))

    text_rows = [(b["input_ids"][i], b["text_mask"][i]) for b in texts for i in range(len(b["input_ids"]))]
    image_rows = [(b["features"][i].float(), b["locations"][i], b["region_mask"][i])
                  for b in images for i in range(len(b["features"]))]

    def alone(image_row, text_row):                 # one pair a call (batch size 1): no padding at all
        ids, mask = text_rows[int(text_row)]
        features, locations, region_mask = image_rows[int(image_row)]
        return ids[None], mask[None], features[None], locations[None], region_mask[None], None
    expected = rerank_both(model, scores, 2, alone, 1, nullcontext())
    for got, want in zip(reranked, expected):
        torch.testing.assert_close(got, want)
    assert (reranked[0] != scores).sum() == 2 * 4 and (reranked[1] != scores.T).sum() == 2 * 5
