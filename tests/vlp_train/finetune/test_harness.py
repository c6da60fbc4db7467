"""The fine-tuning harness on easy-vqa's real questions: regions from detections files, a small
random model (fast) for the loop's guarantees, and one end-to-end run of the real path
(`vlp-data detect --regions grid`, `vlp-train finetune`, `vlp-train evaluate`)."""
import glob
import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from vlp_train.cli import main
from vlp_train.finetune.config import load_config
from vlp_train.finetune.formats import easy_vqa

DIM = 16
TINY = ["model.init=random", "model.layers=1", "model.hidden=32", "model.heads=2", "model.dropout=0.0",
        "data.batch_size=8", "optim.epochs=2", "run.log_every=1"]


def write_detections(path, image_ids, dim=DIM, seed=0, fmt="parquet"):
    """Detections in the `vlp-data detect` layout (image_id, width, height, boxes, labels, scores, features)."""
    rng = np.random.default_rng(seed)
    rows = [{"image_id": i, "width": 64, "height": 64, "boxes": [[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 32.0, 32.0]],
             "labels": ["region", "region"], "scores": [1.0, 0.5], "features": rng.standard_normal((2, dim)).tolist()}
            for i in image_ids]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def first_images(split: str, examples: int) -> list[int]:
    return sorted({int(e.image_ids[0].rsplit("/", 1)[1]) for e in easy_vqa.read(split).examples[:examples]})


@pytest.fixture(scope="module")
def detections(tmp_path_factory):
    folder = tmp_path_factory.mktemp("det")
    train = [f"train/images/{i}.png" for i in first_images("train", 48)]
    test = [f"test/images/{i}.png" for i in first_images("test", 24)]
    write_detections(folder / "a.parquet", train)
    write_detections(folder / "b.jsonl", test, seed=1, fmt="jsonl")
    return f"{folder}/a.parquet,{folder}/b.jsonl"


def tiny_config(output, detections, *more):
    cfg = load_config("easy-vqa", TINY + ["data.max_examples=48", "data.max_eval_examples=24", *more])
    cfg.run.output, cfg.data.detections = str(output), detections
    return cfg


def test_split_data_matches_images_and_reports_the_missing(detections, caplog):
    from vlp_train.finetune.data import SplitData
    from vlp_train.finetune.regions import DetectionIndex
    from vlp_train.finetune.tasks import task_of

    read = easy_vqa.read("train")
    data = SplitData(task_of("easy-vqa"), read, DetectionIndex(detections), max_regions=36, max_examples=60)
    # the first 48 examples' images have detections; the next 12 reach images that have none
    assert len(data) + data.left_out == 60 and data.left_out > 0 and len(data) >= 48
    assert "have no detections" in caplog.text or "have none" in caplog.text
    region = data.regions["train/images/0"]
    assert region.feats.dtype == np.float16 and region.feats.shape == (2, DIM) and region.boxes[0] == [0, 0, 64, 64]


def test_no_matching_ids_stop_with_ids_from_both_sides(tmp_path):
    from vlp_train.finetune.data import SplitData
    from vlp_train.finetune.formats.images import NoImagesMatched
    from vlp_train.finetune.regions import DetectionIndex
    from vlp_train.finetune.tasks import task_of

    path = write_detections(tmp_path / "d.parquet", ["coco/COCO_val2014_000000000042.jpg"])
    with pytest.raises(NoImagesMatched) as err:
        SplitData(task_of("easy-vqa"), easy_vqa.read("test"), DetectionIndex(path), 36, 10)
    assert "test/images/0" in str(err.value) and "COCO_val2014_000000000042" in str(err.value)


def test_pair_model_concatenates_both_cls_states():
    from vlp_train.finetune.heads import ClassifierHead
    from vlp_train.finetune.train import TaskModel

    class Encoder(torch.nn.Module):
        def forward(self, ids, text_mask, feats, locs, region_mask, pixels=None):  # as every family's
            return ids.float().unsqueeze(-1).expand(-1, -1, 3), None

    head = torch.nn.Identity()
    model = TaskModel(Encoder(), head, images=2)
    ids = torch.tensor([[1, 0], [2, 0], [10, 0], [20, 0]])  # example 0: images (1, 10), example 1: (2, 20)
    out = model({"input_ids": ids, "text_mask": None, "features": None, "locations": None, "region_mask": None})
    assert out.tolist() == [[1, 1, 1, 10, 10, 10], [2, 2, 2, 20, 20, 20]]
    assert ClassifierHead(6, 8, 2)(out).shape == (2, 2)


def test_presets_and_overrides():
    vqa = load_config("vqa")
    assert (vqa.optim.epochs, vqa.optim.lr, vqa.data.batch_size, vqa.task.answer_min_count) == (10, 5e-5, 128, 9)
    assert load_config("easy-vqa", ["optim.lr=3e-5"]).optim.lr == 3e-5
    with pytest.raises(ValueError, match="unknown key"):
        load_config("easy-vqa", ["task.nope=1"])
    with pytest.raises(ValueError, match="task.head_lr_scale"):
        from vlp_train.finetune.config import validate
        validate(load_config("easy-vqa", ["task.head_lr_scale=0"]))


def test_killed_and_resumed_finetune_matches_an_unbroken_one(tmp_path, detections):
    from vlp_train.finetune.train import finetune

    whole = finetune(tiny_config(tmp_path / "whole", detections))
    assert whole["steps"] == 12  # 48 examples / 8 a batch x 2 epochs
    cut = finetune(tiny_config(tmp_path / "cut", detections, "run.save_every=4", "run.stop_after=5"))
    assert cut["stopped"] and cut["steps"] == 5
    resumed = finetune(tiny_config(tmp_path / "cut", detections), resume=True)
    assert resumed["steps"] == 12 and resumed["best"] == whole["best"]
    a, b = (torch.load(sorted(glob.glob(f"{tmp_path}/{name}/checkpoints/*.pt"))[-1], weights_only=True)["model"]
            for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # one row a step, none twice
    assert sum("eval" in r for r in rows) == 2  # an evaluation at each epoch's end
    saved = json.load(open(tmp_path / "whole" / "best" / "task.json"))
    assert saved["labels"] == easy_vqa.answers() and saved["step"] == whole["best"]["step"]


@pytest.mark.slow
def test_easy_vqa_end_to_end_beats_the_majority_answer(tmp_path):
    """detect (grid regions) -> finetune (the bundled MiniLM) -> evaluate, on the first questions of
    each split: the accuracy is computed over the real test questions and beats answering every
    question with the most common answer."""
    import shutil

    from pipelines.cli import main as vlp_data

    data = easy_vqa.package_data_dir()
    train_images, test_images = first_images("train", 320), first_images("test", 200)
    for split, ids in (("train", train_images), ("test", test_images)):
        os.makedirs(tmp_path / "images" / split / "images")
        for i in ids:
            shutil.copy(os.path.join(data, split, "images", f"{i}.png"), tmp_path / "images" / split / "images")
    result = CliRunner().invoke(vlp_data, ["detect", "--images", str(tmp_path / "images" / "*" / "images" / "*.png"),
                                           "--output", str(tmp_path / "det"), "--regions", "grid", "--grid-size", "2"])
    assert result.exit_code == 0, result.output
    detections = str(tmp_path / "det" / "detections" / "*.parquet")
    result = CliRunner().invoke(main, ["finetune", "--task", "easy-vqa", "--detections", detections, "--output",
                                       str(tmp_path / "ft"), "--set", "data.max_examples=320",
                                       "--set", "data.max_eval_examples=200", "--set", "optim.epochs=3"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["evaluate", "--task", "easy-vqa", "--model", str(tmp_path / "ft"), "--split",
                                       "test", "--detections", detections, "--max-examples", "200"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    test = easy_vqa.read("test").examples[:200]
    majority = 100 * Counter(e.target for e in test).most_common(1)[0][1] / len(test)
    assert metrics["examples"] == 200 and metrics["accuracy"] > majority + 5, (metrics, majority)
    written = json.load(open(tmp_path / "ft" / "metrics-test.json"))
    assert written["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-3)


def write_nlvr2(folder, split, n):
    """`{split}.json` in the NLVR2 release layout: the label says whether the left image is the 'bright' one."""
    lines = [{"identifier": f"{split}-{i // 2}-{i % 2}-0", "sentence": "the left image is brighter",
              "label": "True" if i % 3 else "False", "left_url": "x", "right_url": "y"} for i in range(n)]
    (folder / f"{split}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [k for line in lines for k in (line["identifier"].rsplit("-", 1)[0] + "-img0",
                                          line["identifier"].rsplit("-", 1)[0] + "-img1")]


def write_snli_ve(folder, split, n):
    labels = ["entailment", "neutral", "contradiction"]
    lines = [{"Flikr30kID": f"{1000 + i}.jpg", "sentence2": "a dog runs", "gold_label": labels[i % 3],
              "pairID": f"{split}{i}"} for i in range(n)]
    (folder / f"snli_ve_{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [f"flickr30k-images/{1000 + i}.jpg" for i in range(n)]


@pytest.mark.parametrize("task, write, splits, metrics", [
    ("nlvr2", write_nlvr2, ("train", "dev"), {"accuracy", "consistency"}),
    ("snli-ve", write_snli_ve, ("train", "dev"), {"accuracy"})])
def test_other_classification_tasks_run_end_to_end(tmp_path, task, write, splits, metrics):
    """NLVR2's pair model (two images an example) and SNLI-VE's 3-way head, on files in their
    release layout: fine-tune, then evaluate prints the official metrics."""
    from vlp_train.finetune.train import evaluate, finetune

    images = [k for split in splits for k in write(tmp_path, split, 12)]
    detections = write_detections(tmp_path / "det.parquet", sorted(set(images)))
    cfg = load_config(task, TINY + ["optim.epochs=1", "data.batch_size=4"])
    cfg.run.output, cfg.data.detections, cfg.data.data = str(tmp_path / "ft"), detections, str(tmp_path)
    summary = finetune(cfg)
    assert summary["steps"] == 3 and set(summary["best"]["metrics"]) == metrics
    result = evaluate(task, str(tmp_path / "ft"), str(tmp_path), "dev", detections)
    assert result["examples"] == 12 and result["accuracy"] == summary["best"]["metrics"]["accuracy"]


def write_refcoco(folder, images_per_split=8):
    """refcoco+/refs(unc).json (the JSON conversion of refs(unc).p) + instances.json, and detections
    of 3 boxes an image, one of them the referred object's, whose features stand out."""
    refs, images, annotations, rows = [], [], [], []
    rng = np.random.default_rng(3)
    for n, split in enumerate(("train", "val")):
        for i in range(images_per_split):
            image_id = 100 * (n + 1) + i
            images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": 100,
                           "width": 100})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [10, 10, 30, 30],
                                "area": 900.0, "segmentation": [], "iscrowd": 0})
            refs.append({"ref_id": image_id, "ann_id": image_id, "image_id": image_id, "category_id": 1,
                         "split": split, "sent_ids": [image_id],
                         "sentences": [{"sent_id": image_id, "sent": "the marked one", "raw": "The marked one",
                                        "tokens": ["the", "marked", "one"]}], "file_name": "x.jpg"})
            boxes = [[50.0, 50.0, 90.0, 90.0], [10.0, 10.0, 40.0, 40.0], [0.0, 60.0, 30.0, 100.0]]
            order = rng.permutation(3).tolist()
            features = 0.1 * rng.standard_normal((3, DIM))
            features[order.index(1)] += 3.0  # the referred object's region
            rows.append({"image_id": f"train2014/COCO_train2014_{image_id:012d}.jpg", "width": 100, "height": 100,
                         "boxes": [boxes[j] for j in order], "labels": ["person"] * 3, "scores": [0.9, 0.8, 0.7],
                         "features": features.tolist()})
    (folder / "refcoco+").mkdir()
    (folder / "refcoco+" / "refs(unc).json").write_text(json.dumps(refs))
    (folder / "refcoco+" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}))
    pq.write_table(pa.Table.from_pylist(rows), folder / "det.parquet")
    return str(folder / "det.parquet")


def test_refcoco_scores_regions_and_picks_the_referred_box(tmp_path):
    """RefCOCO+ (det setting): the target is the detection of largest IoU with the referred box; the
    prediction is the top-scored region's box, right at IoU >= 0.5. The referred regions' features
    stand out here, so a few steps learn to pick them."""
    from vlp_train.finetune.train import evaluate, finetune

    detections = write_refcoco(tmp_path)
    cfg = load_config("refcoco+", TINY + ["optim.epochs=8", "optim.lr=3e-3", "data.batch_size=4"])
    cfg.run.output, cfg.data.detections, cfg.data.data = str(tmp_path / "ft"), detections, str(tmp_path)
    summary = finetune(cfg)
    assert summary["steps"] == 16
    result = evaluate("refcoco+", str(tmp_path / "ft"), str(tmp_path), "val", detections)
    assert result["examples"] == 8 and result["accuracy"] == summary["best"]["metrics"]["accuracy"]
    assert result["accuracy"] > 100 / 3 + 20  # chance: one region in three


def write_karpathy(folder):
    """dataset_flickr30k.json (Karpathy layout): 4 train and 4 test images, 2 captions each, and
    detections whose tags name what the captions speak of (the first stage searches with them)."""
    things = ["dog", "cat", "car", "horse", "bird", "boat", "cup", "bus"]
    images, rows, sentid = [], [], 0
    for i, thing in enumerate(things):
        sentences = []
        for template in ("a {} in the picture", "there is a {} here"):
            sentences.append({"sentid": sentid, "imgid": i, "raw": template.format(thing), "tokens": []})
            sentid += 1
        images.append({"imgid": i, "split": "train" if i < 4 else "test", "filename": f"{1000 + i}.jpg",
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        rows.append({"image_id": f"flickr30k-images/{1000 + i}.jpg", "width": 64, "height": 64,
                     "boxes": [[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 32.0, 32.0]], "labels": [thing, "grass"],
                     "scores": [0.9, 0.5], "features": np.random.default_rng(i).standard_normal((2, DIM)).tolist()})
    (folder / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    pq.write_table(pa.Table.from_pylist(rows), folder / "det.parquet")
    return str(folder / "det.parquet")


def test_retrieval_fine_tunes_itm_and_reranks_the_first_stage(tmp_path):
    """Retrieval: ITM trained on matched and mismatched pairs; evaluation re-ranks the first stage's
    top K (sentence-BERT of each image's tags vs the caption) with ITM. Here the tags name the
    captions' subject, so with K = 1 each caption's one candidate is its own image (IR@1 = 100)
    whatever ITM says; with K = all, ITM alone orders the candidates."""
    from vlp_train.finetune.train import evaluate, finetune

    detections = write_karpathy(tmp_path)
    cfg = load_config("retrieval", TINY + ["optim.epochs=1", "data.batch_size=4", "data.eval_split=test"])
    cfg.run.output, cfg.data.detections, cfg.data.data = str(tmp_path / "ft"), detections, str(tmp_path)
    summary = finetune(cfg)
    assert summary["steps"] == 2 and {"tr@1", "ir@1", "ir@10", "rmean"} <= set(summary["best"]["metrics"])
    one = evaluate("retrieval", str(tmp_path / "ft"), str(tmp_path), "test", detections, candidates=1)
    assert one["examples"] == 8 and one["ir@1"] == 100.0
    every = evaluate("retrieval", str(tmp_path / "ft"), str(tmp_path), "test", detections, candidates=8)
    assert every["rmean"] == pytest.approx(summary["best"]["metrics"]["rmean"])


def test_compiled_layers_as_in_pre_training(tmp_path, detections):
    """model.compile=on: the transformer layer compiled once for all (compile.CompiledLayers), the
    task model's output as the eager one's; the whole-step scope is refused."""
    from vlp_train.compile import CompiledLayers
    from vlp_train.finetune.data import Collate
    from vlp_train.finetune.train import build_finetune
    from vlp_train.step import to_device

    outputs = []
    for mode in ("off", "on"):
        cfg = tiny_config(tmp_path / mode, detections, f"model.compile={mode}")
        run = build_finetune(cfg)
        assert isinstance(run.model.model.bert.call_layer, CompiledLayers) == (mode == "on")
        run.model.eval()
        batch = Collate(run.train, run.builder, {label: i for i, label in enumerate(run.labels)})(list(range(8)))
        torch.manual_seed(0)
        run.model.head.apply(lambda m: torch.nn.init.normal_(m.weight) if isinstance(m, torch.nn.Linear) else None)
        run.model.model.load_state_dict(outputs[0][1]) if outputs else None
        outputs.append((run.model(to_device({"x": batch["inputs"]}, run.device)["x"]).detach(),
                        run.model.model.state_dict()))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="compile_scope=step"):
        build_finetune(tiny_config(tmp_path / "step", detections, "model.compile=on", "model.compile_scope=step"))


def test_a_run_reads_its_detections_once(tmp_path, monkeypatch):
    """Train and validation images in one detections file: the file's records are read once for
    both splits (not once per split), and each split gets its own images' regions."""
    from vlp_train.finetune import regions
    from vlp_train.finetune.train import build_finetune

    images = [k for split in ("train", "dev") for k in write_nlvr2(tmp_path, split, 6)]  # 12 images a split
    detections = write_detections(tmp_path / "det.parquet", sorted(set(images)))
    reads = []
    records = regions._records
    monkeypatch.setattr(regions, "_records",
                        lambda path, rows: (reads.append((path, len(rows))), records(path, rows))[1])
    cfg = load_config("nlvr2", TINY)
    cfg.run.output, cfg.data.detections, cfg.data.data = str(tmp_path / "ft"), detections, str(tmp_path)
    run = build_finetune(cfg)
    assert reads == [(detections, 24)]
    assert len(run.train.regions) == len(run.val.regions) == 12 and not set(run.train.regions) & set(run.val.regions)
