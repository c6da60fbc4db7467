"""Held-out evaluation of VLMo (vlp_train/families/vlmo.py): zero-shot image-to-text and
text-to-image retrieval over the held-out shards' pairs (each image with one of its retrieved
sentences), recall@1/5/10 with the dual encoder (dot products of the projected [CLS] states) and
with ITM re-ranking of the dual encoder's top `run.rerank_k`, each timed per 1,000 queries; the
fusion MLM accuracy; the stages' own measures (the vision stage's region-feature regression
error, the language stage's text-only MLM accuracy); and, when μ-VLA's granularities train beside
VLMo's, the single-stream evaluation of them on the fusion encoder.

A text is a right answer for every image that retrieved it, among its K (texts are compared by
their keys, `masking.text_key`): the gallery's text of image i is one of i's sentences, and it may
be one of another image's too."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from vlp_train.evaluate import count_masked_tokens, held_out_stream, per_1k_queries, recall_at
from vlp_train.objectives.contrastive import NO_KEY, in_sets
from vlp_train.objectives.vlmo import image_only_regression
from vlp_train.step import to_device
from vlp_train.tasks import Task


def _pad_cat(tensors: list[torch.Tensor], value=0) -> torch.Tensor:
    """Batches of [B, N, ...] with different N -> one [sum B, max N, ...]."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]], value=value) for t in tensors])


@torch.no_grad()
def rerank_scores(model, scores: torch.Tensor, k: int, pair_of, batch_size: int, autocast) -> torch.Tensor:
    """The dual encoder's scores [Q, C] with each query's top k re-scored by the fusion ITM (the match
    logit minus the mismatch logit, lifted above every score outside the top k, which keep the dual
    encoder's order: recall@K for K > k still counts them). `pair_of(queries, candidates)` -> the
    model inputs of those (query, candidate) pairs. Both directions of one score matrix:
    rerank_both (a pair in both directions' top k scored once)."""
    top = scores.topk(k, dim=1).indices                       # [Q, k]
    queries = torch.arange(scores.shape[0]).repeat_interleave(k)
    return _lifted(scores, top, itm_scores(model, queries, top.flatten(), pair_of, batch_size, autocast).view(-1, k))


def rerank_both(model, scores: torch.Tensor, k: int, pair_of, batch_size: int, autocast):
    """rerank_scores both ways of scores [images, texts]: (image -> text [images, texts], text ->
    image [texts, images]), each image's top k texts and each text's top k images re-scored by the
    fusion ITM, every distinct (image, text) pair scored once: a pair in an image's top k and in its
    text's top k serves both (the figures are rerank_scores' of each direction apart).
    `pair_of(images, texts)` -> the model inputs of those pairs."""
    n_images, n_texts = scores.shape
    by_image = scores.topk(k, dim=1).indices                  # [images, k] texts
    by_text = scores.T.topk(k, dim=1).indices                 # [texts, k] images
    image_text = torch.cat([torch.arange(n_images).repeat_interleave(k) * n_texts + by_image.flatten(),
                            by_text.flatten() * n_texts + torch.arange(n_texts).repeat_interleave(k)])
    pairs, where = torch.unique(image_text, return_inverse=True)
    itm = itm_scores(model, pairs // n_texts, pairs % n_texts, pair_of, batch_size, autocast)[where]
    return (_lifted(scores, by_image, itm[:n_images * k].view(-1, k)),
            _lifted(scores.T, by_text, itm[n_images * k:].view(-1, k)))


@torch.no_grad()
def rerank_retrieval(model, scores: torch.Tensor, k: int, texts: list[dict], images: list[dict], batch_size: int,
                     autocast, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A dual encoder's retrieval re-ranked by the fusion ITM from the inputs it scored (held-out
    evaluation's and fine-tuned retrieval's --rerank-k, one path): scores [images, texts]; `texts`
    the texts' batches ({input_ids, text_mask}) in the scores' column order, `images` the images'
    ({features, locations, region_mask}, + pixels for a model on patches) in its row order, on the
    host or on `device`. The batches are padded into one tensor a field and each scored pair's rows
    sent to `device`. -> rerank_both's (image -> text [images, texts], text -> image [texts, images])."""
    ids, text_mask = _pad_cat([x["input_ids"] for x in texts]), _pad_cat([x["text_mask"] for x in texts], False)
    features, locations = _pad_cat([x["features"] for x in images]), _pad_cat([x["locations"] for x in images])
    region_mask = _pad_cat([x["region_mask"] for x in images], False)
    pixels = torch.cat([x["pixels"] for x in images]) if images[0].get("pixels") is not None else None

    def pair_of(image_rows, text_rows):
        text_rows, image_rows = text_rows.to(ids.device), image_rows.to(features.device)
        x = to_device({"x": {"input_ids": ids[text_rows], "text_mask": text_mask[text_rows],
                             "features": features[image_rows], "locations": locations[image_rows],
                             "region_mask": region_mask[image_rows],
                             "pixels": pixels[image_rows] if pixels is not None else None}}, device)["x"]
        return x["input_ids"], x["text_mask"], x["features"], x["locations"], x["region_mask"], x["pixels"]
    return rerank_both(model, scores, k, pair_of, batch_size, autocast)


def itm_scores(model, rows: torch.Tensor, columns: torch.Tensor, pair_of, batch_size: int, autocast) -> torch.Tensor:
    """The fusion ITM's match logit minus its mismatch logit of each pair pair_of(rows, columns), in batches."""
    itm = []
    for start in range(0, len(rows), batch_size):
        with autocast:
            text, _ = model(*pair_of(rows[start:start + batch_size], columns[start:start + batch_size]))
            logits = model.itm_logits(text).float()
        itm.append((logits[:, 1] - logits[:, 0]).cpu())
    return torch.cat(itm)


def _lifted(scores: torch.Tensor, top: torch.Tensor, itm: torch.Tensor) -> torch.Tensor:
    """scores [Q, C] with each query's `top` [Q, k] candidates set to their ITM scores [Q, k], lifted
    above every other score."""
    itm = itm.to(scores.dtype)
    lift = scores.max() - itm.min() + 1                      # every re-scored pair above every other
    return scores.clone().scatter_(1, top, itm + lift)


@torch.no_grad()
def evaluate_vlmo(model, builder, urls: list[str], tasks: list[Task], cfg, device, autocast) -> dict:
    from vlp_train.evaluate import evaluate as evaluate_single_stream

    eval_tasks = [Task.IMAGE_TEXT] + [t for t in (Task.IMAGE_ONLY, Task.TEXT_ONLY) if t in tasks]
    stream = held_out_stream(urls, builder, eval_tasks, cfg)
    was_training = model.training
    model.eval()
    # each batch's text keys (and retrieved keys), and its inputs for ITM re-ranking (rerank_retrieval's)
    pairs = {"keys": [], "retrieved": [], "texts": [], "images": []}
    image_features, text_features, hits, regression = [], [], {"sentence_mlm": [0, 0], "text_mlm": [0, 0]}, [0.0, 0]
    dual_s = 0.0
    for n, batch in enumerate(stream):
        if n >= cfg.run.eval_batches:
            break
        views = to_device(batch["views"], device)
        view = views[Task.IMAGE_TEXT]
        started = time.perf_counter()
        with autocast:
            image_features.append(model.embed_images(view["features"], view["locations"], view["region_mask"],
                                                     view.get("pixels")).cpu())
            text_features.append(model.embed_texts(view["clean_ids"], view["text_mask"]).cpu())
        dual_s += time.perf_counter() - started
        for name, field in (("keys", "text_keys"), ("retrieved", "retrieved_keys")):
            if field in view:
                pairs[name].append(view[field])
        pairs["texts"].append({"input_ids": view["clean_ids"], "text_mask": view["text_mask"]})
        pairs["images"].append({name: view[name] for name in ("features", "locations", "region_mask", "pixels")
                                if name in view})
        with autocast:
            text, _ = model(view["input_ids"], view["text_mask"], view["features"], view["locations"],
                            view["region_mask"], view.get("pixels"))
        count_masked_tokens(model, text, view, hits["sentence_mlm"])
        if Task.TEXT_ONLY in views:
            text_view = views[Task.TEXT_ONLY]
            with autocast:
                states = model.encode_text(text_view["input_ids"], text_view["text_mask"])
            count_masked_tokens(model, states, text_view, hits["text_mlm"])
        if Task.IMAGE_ONLY in views:
            image_view = views[Task.IMAGE_ONLY]
            with autocast:
                error, _ = image_only_regression(model, image_view)  # per sample: the mean over its masked ones
            regression[0] += error.sum().item()
            regression[1] += error.shape[0]
    result = {f"{name}_acc": right / total for name, (right, total) in hits.items() if total}
    if regression[1]:
        result["region_regression_mse"] = regression[0] / regression[1]
    if image_features:
        result.update(_retrieval(model, torch.cat(image_features), torch.cat(text_features), pairs, dual_s, cfg,
                                 device, autocast))
    if any(t in tasks for t in (Task.REGION_TAG, Task.REGION_PHRASE, Task.IMAGE_SENTENCE)):
        single = evaluate_single_stream(model, builder, urls, tasks, cfg, device, autocast)
        result.update({f"mu_vla/{k}": v for k, v in single.items()})
    model.train(was_training)
    return result


def _retrieval(model, images, texts, pairs, dual_s, cfg, device, autocast) -> dict:
    count = images.shape[0]
    keys = torch.cat(pairs["keys"]).cpu()
    positive = keys[:, None] == keys[None, :]      # image i x text j: j is (a copy of) i's sentence
    if pairs["retrieved"]:                         # ... or another of the sentences i retrieved
        positive |= in_sets(keys, _pad_cat(pairs["retrieved"], NO_KEY).cpu())
    started = time.perf_counter()
    scores = images @ texts.T                       # [images, texts]
    dual_s += time.perf_counter() - started
    result = {"pairs": count}
    directions = {"i2t": (scores, positive), "t2i": (scores.T, positive.T)}
    for name, (s, p) in directions.items():
        result.update({f"{name}_r{k}": v for k, v in recall_at(s, p).items()})
    # both directions' queries: the dual encoder's cost per 1,000 of them
    result["dual_s_per_1k_queries"] = per_1k_queries(dual_s, 2 * count)
    k = min(cfg.run.rerank_k, count)
    if k:
        started = time.perf_counter()
        i2t, t2i = rerank_retrieval(model, scores, k, pairs["texts"], pairs["images"], cfg.data.batch_size,
                                    autocast, device)
        reranked = {"i2t": i2t, "t2i": t2i}
        rerank_s = time.perf_counter() - started
        for name, s in reranked.items():
            result.update({f"{name}_itm_r{r}": v for r, v in recall_at(s, directions[name][1]).items()})
        # the dual encoder's share plus k fusion passes a query
        result["itm_rerank_s_per_1k_queries"] = per_1k_queries(dual_s + rerank_s, 2 * count)
        result["rerank_k"] = k
    return result
