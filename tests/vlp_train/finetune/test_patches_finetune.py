"""Fine-tuning a model that sees the images' pixels (model.visual patches or both): refused up
front, before any data is read, when the run has no images; with --images, the dataset's image
files decoded as pre-training decodes them, carried as uint8 into the model's `pixels`."""
import io
import json
import logging
import os
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import BertTokenizerFast

from vlp_train.finetune.config import load_config

from .test_harness import DIM, TINY, write_karpathy

PATCHES = ["model.image_size=32", "model.patch_size=8"]


def export_model(folder, arch: str, visual: str) -> str:
    """A tiny pre-trained model of `arch` seeing `visual`, saved as a run's hf/ export is."""
    from vlp_train.families import build_model
    from vlp_train.pretrained import bundled_minilm_path

    cfg = load_config("easy-vqa", TINY + PATCHES + [f"model.arch={arch}", f"model.visual={visual}"]
                      + {"vlmo": ["model.vl_layers=1"], "vlmae": ["model.layers=2", "model.fusion_layers=1",
                                                                    "model.decoder_layers=1", "model.decoder_hidden=16",
                                                                    "model.decoder_heads=2"]}.get(arch, []))
    model = build_model(cfg.model, DIM, ["region"])
    model.save_pretrained(str(folder), BertTokenizerFast.from_pretrained(bundled_minilm_path()))
    return str(folder)


@pytest.mark.parametrize("arch,visual", [("single_stream", "patches"), ("vlmo", "both")])
def test_a_pixel_model_without_images_is_refused_before_any_data_is_read(tmp_path, monkeypatch, arch, visual):
    from vlp_train.finetune import train

    folder = export_model(tmp_path / "hf", arch, visual)
    cfg = load_config("easy-vqa", [f"model.init={folder}", "model.dropout=0.0"])
    cfg.run.output, cfg.data.detections = str(tmp_path / "ft"), str(tmp_path / "none-*.parquet")

    def no_reading(*args, **kwargs):
        raise AssertionError("data read before the model's visual input was checked")

    monkeypatch.setattr(train, "DetectionIndex", no_reading)
    monkeypatch.setattr(train, "read_split", no_reading)
    with pytest.raises(ValueError, match=rf"model.init {folder} has model.visual={visual}: it needs the images' "
                                         r"pixels.*give --images DIR"):
        train.build_finetune(cfg)


def test_a_fresh_pixel_model_without_images_is_refused(tmp_path):
    from vlp_train.finetune.train import build_finetune

    cfg = load_config("easy-vqa", TINY + PATCHES + ["model.visual=patches"])
    cfg.run.output, cfg.data.detections = str(tmp_path / "ft"), str(tmp_path / "none-*.parquet")
    with pytest.raises(ValueError, match=r"this run has model.visual=patches: it needs the images' pixels"):
        build_finetune(cfg)


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def write_colour_vqa(folder, per_split=8) -> str:
    """A folder in easy-VQA's layout whose answers only the pixels tell: each image one colour
    (noisy), the question "what color is it?" (no detections anywhere)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "answers.txt").write_text("red\nblue\n")
    for split in ("train", "test"):
        (folder / split / "images").mkdir(parents=True)
        questions = []
        for i in range(per_split):
            colour = "red" if i % 2 == 0 else "blue"
            pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / split / "images" / f"{i}.png")
            questions.append(["what color is it?", colour, i])
        (folder / split / "questions.json").write_text(json.dumps(questions))
    return str(folder)


def test_a_patch_model_fine_tunes_on_the_images_pixels_and_evaluates(tmp_path):
    """A pre-trained model on patches alone, no detections: each batch carries the examples' own
    images as pre-training decodes them (load_pixels at the model's image_size, uint8), the model
    reads them (another image, another output), 2 steps train the patch embedding too, and
    `evaluate` scores the best model as the fine-tuning's last evaluation did."""
    from vlp_train.finetune.data import Collate
    from vlp_train.cli import main
    from vlp_train.finetune.train import build_finetune, evaluate, finetune
    from vlp_train.step import to_device
    from vlp_train.visual import load_pixels

    data = write_colour_vqa(tmp_path / "cvqa")
    folder = export_model(tmp_path / "hf", "single_stream", "patches")
    cfg = load_config("easy-vqa", [f"model.init={folder}", "model.dropout=0.0", "data.batch_size=4", "optim.epochs=1",
                                   "run.log_every=1"])
    cfg.run.output, cfg.data.data, cfg.data.images = str(tmp_path / "ft"), data, data
    run = build_finetune(cfg)
    assert len(run.train) == 8 and not run.train.regions and run.builder.image_size == 32
    batch = Collate(run.train, run.builder, {label: i for i, label in enumerate(run.labels)})([0, 1, 2])
    pixels = batch["inputs"]["pixels"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32, 3)
    for row, example in zip(pixels, run.train.examples[:3]):
        path = f"{data}/{example.image_ids[0]}.png"
        with open(path, "rb") as f:
            assert torch.equal(row, torch.from_numpy(load_pixels(f.read(), 32)))
    assert batch["inputs"]["region_mask"].shape == (3, 0)
    run.model.eval()
    logits = run.model(to_device({"x": batch["inputs"]}, run.device)["x"])
    assert not torch.allclose(logits[0], logits[1])  # same question, a red and a blue image

    # the command line: --images, no --detections
    out = str(tmp_path / "ft-cli")
    ran = CliRunner().invoke(main, ["finetune", "--task", "easy-vqa", "--init", folder, "--data", data, "--images", data,
                                    "--output", out, "--set", "model.dropout=0.0", "--set", "data.batch_size=4",
                                    "--set", "optim.epochs=1"])
    assert ran.exit_code == 0, ran.output
    assert "2 steps ->" in ran.output
    with open(f"{out}/metrics.json", encoding="utf-8") as f:
        best = json.load(f)
    scored = CliRunner().invoke(main, ["evaluate", "--task", "easy-vqa", "--model", out, "--data", data,
                                       "--split", "test", "--images", data])
    assert scored.exit_code == 0, scored.output
    result = json.loads(scored.output.strip().splitlines()[-1])
    assert result["examples"] == 8 and result["accuracy"] == pytest.approx(best["accuracy"])
    summary = finetune(cfg)  # the same in Python, from the config
    assert summary["steps"] == 2 and summary["best"]["metrics"]["accuracy"] == best["accuracy"]
    with pytest.raises(ValueError, match=r"--model .* has model.visual=patches: it needs the images' pixels"):
        evaluate("easy-vqa", cfg.run.output, data, "test", None)


@pytest.mark.parametrize("arch,visual", [("vlmo", "both"), ("vlmae", "patches")])
def test_the_other_pixel_models_fine_tune_and_evaluate(tmp_path, arch, visual):
    """VLMo on both (regions from the detections and the pixels: a batch carries both) and VLMAE on
    patches: 2 steps and the same score from `evaluate`."""
    from vlp_train.finetune.data import Collate
    from vlp_train.finetune.train import build_finetune, evaluate, finetune

    from .test_harness import write_detections

    data = write_colour_vqa(tmp_path / "cvqa")
    detections = write_detections(tmp_path / "det.parquet", [f"{s}/images/{i}.png" for s in ("train", "test")
                                                             for i in range(8)]) if visual == "both" else None
    folder = export_model(tmp_path / "hf", arch, visual)
    cfg = load_config("easy-vqa", [f"model.init={folder}", "model.dropout=0.0", "data.batch_size=4", "optim.epochs=1"])
    cfg.run.output, cfg.data.data, cfg.data.images = str(tmp_path / "ft"), data, data
    cfg.data.detections = detections or ""
    run = build_finetune(cfg)
    inputs = Collate(run.train, run.builder, {label: i for i, label in enumerate(run.labels)})([0, 1])["inputs"]
    assert inputs["pixels"].shape == (2, 32, 32, 3)
    assert inputs["features"].shape == ((2, 2, DIM) if visual == "both" else (2, 0, 0))
    summary = finetune(cfg)
    assert summary["steps"] == 2
    result = evaluate("easy-vqa", cfg.run.output, data, "test", detections, images=data)
    assert result["examples"] == 8 and result["accuracy"] == summary["best"]["metrics"]["accuracy"]


def test_vlmo_on_patches_fine_tunes_retrieval_as_a_dual_encoder_on_jpegs(tmp_path):
    """VLMo's seed setting (model.visual=patches) on Karpathy retrieval: ITC over the batch with each
    image's JPEG, ranked by the dual encoder over the images' pixels; no detections."""
    from vlp_train.finetune.train import evaluate, finetune

    write_karpathy(tmp_path)  # dataset_flickr30k.json: 4 train, 4 test images (its detections unused)
    rng = np.random.default_rng(1)
    (tmp_path / "images" / "flickr30k-images").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(
            tmp_path / "images" / "flickr30k-images" / f"{1000 + i}.jpg", quality=90)
    folder = export_model(tmp_path / "hf", "vlmo", "patches")
    cfg = load_config("retrieval", [f"model.init={folder}", "model.dropout=0.0", "data.batch_size=4",
                                    "optim.epochs=1", "data.eval_split=test", "run.log_every=1"])
    cfg.run.output, cfg.data.data, cfg.data.images = str(tmp_path / "ft"), str(tmp_path), str(tmp_path / "images")
    summary = finetune(cfg)
    assert summary["steps"] == 2 and {"tr@1", "ir@1", "rmean"} <= set(summary["best"]["metrics"])
    result = evaluate("retrieval", cfg.run.output, str(tmp_path), "test", None, images=str(tmp_path / "images"))
    assert result["examples"] == 8 and result["rmean"] == pytest.approx(summary["best"]["metrics"]["rmean"])
    # ITM re-scoring each query's top k over the pixels the dual encoder's passes decoded
    reranked = evaluate("retrieval", cfg.run.output, str(tmp_path), "test", None, images=str(tmp_path / "images"),
                        rerank_k=4, output=str(tmp_path / "reranked.json"))
    assert reranked["rerank_k"] == 4 and reranked["examples"] == 8 and {"tr@1", "ir@1", "rmean"} <= set(reranked)


def test_missing_and_undecodable_images_are_left_out_and_reported(tmp_path, caplog):
    """A missing image file and one that cannot be decoded (not an image; a JPEG cut short, whose
    header is whole) alike: their examples left out when the split is read, counted and reported
    with the file and the examples. Before: the undecodable one stopped the run at its first batch."""
    from vlp_train.finetune.data import SplitData
    from vlp_train.finetune.formats import easy_vqa
    from vlp_train.finetune.pixels import ImageFolder
    from vlp_train.finetune.tasks import task_of

    data = write_colour_vqa(tmp_path / "cvqa")
    images = tmp_path / "only"  # lacks test image 3; image 5 is not an image; image 6 is a JPEG cut short
    (images / "test" / "images").mkdir(parents=True)
    for i in (0, 1, 2, 4, 7):
        (images / "test" / "images" / f"{i}.png").write_bytes((tmp_path / f"cvqa/test/images/{i}.png").read_bytes())
    (images / "test" / "images" / "5.png").write_bytes(b"\x89PNG not really")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (images / "test" / "images" / "6.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) * 2 // 3])
    with caplog.at_level(logging.WARNING):
        split = SplitData(task_of("easy-vqa"), easy_vqa.read("test", data), None, 36, 8, ImageFolder(str(images)), 32)
    assert [e.example_id for e in split.examples] == ["test-0", "test-1", "test-2", "test-4", "test-7"]
    assert split.left_out == 3 and "test/images/3" in caplog.text
    damaged = {os.path.basename(path): (why, ids) for path, (why, ids) in split.damaged.items()}
    assert sorted(damaged) == ["5.png", "6.jpg"]
    assert damaged["5.png"][1] == ["test-5"] and damaged["6.jpg"] == (
        "a JPEG without its end-of-image marker (the file is cut short)", ["test-6"])
    assert re.search(r"image file \S*5\.png cannot be decoded \(not an image PIL can identify\); left out with its example\(s\) test-5", caplog.text)
    assert re.search(r"image file \S*6\.jpg cannot be decoded .*cut short\)\); left out with its example\(s\) test-6",
                     caplog.text)
    assert "2 image file(s) cannot be decoded, 2 example(s) left out" in caplog.text
    assert all(split.pixels(e.image_ids[0], e.example_id).shape == (32, 32, 3) for e in split.examples)  # kept: decodes


def exif_with_thumbnail(rng) -> bytes:
    """An APP1 EXIF payload whose IFD1 holds a JPEG thumbnail, as a camera writes it: a second FFD8
    ... FFD9 inside the header, before the image's own scan."""
    import struct

    thumbnail = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(thumbnail, "JPEG")
    thumbnail = thumbnail.getvalue()
    ifd1 = 14  # after the TIFF header (8) and an empty IFD0 (2 + next-IFD offset 4)
    tiff = b"II*\x00" + struct.pack("<IHI", 8, 0, ifd1) + struct.pack("<H", 2)
    tiff += struct.pack("<HHII", 0x0201, 4, 1, ifd1 + 2 + 2 * 12 + 4)  # JPEGInterchangeFormat: its offset
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)  # ...Length
    return b"Exif\x00\x00" + tiff + thumbnail


def test_the_image_check_passes_whole_images_and_finds_damaged_ones(tmp_path):
    """pixels.image_problem without a decode: whole PNG / JPEG / MPO files pass (a JPEG with bytes
    after its end marker too: libjpeg-turbo ignores them; fill bytes before a marker too); a JPEG
    cut anywhere after its header, a PNG cut short, bytes that are no image, bytes that are no
    marker in a JPEG's header fail, each as load_pixels would. A camera's JPEG / MPO carries an EXIF
    thumbnail (an FFD9 in its header): cut short inside its first scan, it still fails. Before, an
    MPO passed: Pillow's MPO plugin seeks back to 0 after open, so the FFD9 search started at the
    file's start and found the thumbnail's."""
    from vlp_train.finetune.pixels import first_scan_data, image_problem
    from vlp_train.visual import load_pixels

    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    exif = exif_with_thumbnail(rng)
    files = {}
    for kind in ("PNG", "JPEG", "MPO"):
        encoded = io.BytesIO()
        extra = {"JPEG": {"exif": exif}, "MPO": {"exif": exif, "save_all": True,
                                                  "append_images": [Image.fromarray(array[::-1])]}}.get(kind, {})
        Image.fromarray(array).save(encoded, kind, **extra)
        files[kind] = encoded.getvalue()
    plain = io.BytesIO()
    Image.fromarray(array).save(plain, "JPEG")
    plain = plain.getvalue()
    for kind in ("JPEG", "MPO"):  # the thumbnail's end marker lies before the image's first scan data
        assert 0 <= files[kind].find(b"\xff\xd9") < first_scan_data(files[kind])
    dqt = plain.find(b"\xff\xdb")
    cases = {"whole.png": files["PNG"], "whole.jpg": files["JPEG"], "trailing.jpg": files["JPEG"] + b"\x00" * 64,
             "jpeg-named.png": files["JPEG"], "camera.mpo": files["MPO"],
             "fill-bytes.jpg": plain[:dqt] + b"\xff\xff" + plain[dqt:],
             "cut.png": files["PNG"][:len(files["PNG"]) // 2],
             "cut-late.jpg": files["JPEG"][:-2], "cut-early.jpg": files["JPEG"][:len(files["JPEG"]) // 3],
             "cut-in-scan.jpg": files["JPEG"][:first_scan_data(files["JPEG"]) + 500],
             "cut-in-scan.mpo": files["MPO"][:first_scan_data(files["MPO"]) + 500],
             "not-a-marker.jpg": plain[:dqt] + b"\x12\x34" + plain[dqt:],
             "empty.jpg": b"", "text.jpg": b"not an image"}
    found = {}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        found[name] = image_problem(str(tmp_path / name))
        with pytest.raises(ValueError) if found[name] else nullcontext():
            load_pixels(content, 32)  # agrees with the decode
    assert [name for name, problem in found.items() if problem is None] == [
        "whole.png", "whole.jpg", "trailing.jpg", "jpeg-named.png", "camera.mpo", "fill-bytes.jpg"]
    assert found["cut-in-scan.mpo"] == found["cut-in-scan.jpg"] == (
        "a JPEG without its end-of-image marker (the file is cut short)")


def test_a_file_that_cannot_be_read_stops_the_run_with_its_path_not_counted_as_damaged(tmp_path, monkeypatch):
    """An OSError opening or reading an image file (permissions, EIO, a stale NFS handle, too many
    open files) is the machine's, not the image's, and may be one rank's alone: before, it was
    reported as "cannot be decoded" and the examples left out. Now it stops with the path."""
    from vlp_train.finetune import pixels
    from vlp_train.finetune.pixels import ImageFolder, image_problem

    (tmp_path / "a.png").write_bytes(b"\x89PNG not read")
    (tmp_path / "b.png").write_bytes(b"\x89PNG not read")

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(pixels, "open", unreadable, raising=False)  # tests run as root: no chmod
    with pytest.raises(OSError, match=rf"--images {re.escape(str(tmp_path / 'a.png'))}: the image file cannot be "
                                      r"read \(Permission denied\)"):
        image_problem(str(tmp_path / "a.png"))
    folder = ImageFolder(str(tmp_path))
    with pytest.raises(OSError, match="cannot be read"):
        folder.damaged(folder.files, "test")


def test_what_a_model_sees_decides_what_the_run_needs():
    from vlp_train.finetune.tasks import task_for, task_of
    from vlp_train.finetune.train import VisualInput, check_inputs

    patches, both = VisualInput("patches", 32, 16, "model.init M"), VisualInput("both", 32, 16, "model.init M")
    check_inputs(patches, task_of("vqa"), "IMAGES", "")                       # pixels alone suffice
    check_inputs(patches, task_for("retrieval", "auto", True), "IMAGES", "")  # the dual encoder too
    with pytest.raises(ValueError, match="model.visual=both"):
        check_inputs(both, task_of("vqa"), "IMAGES", "")                      # both: regions too
    with pytest.raises(ValueError, match="refcoco\\+ reads the images' detected regions"):
        check_inputs(patches, task_of("refcoco+"), "IMAGES", "")
    with pytest.raises(ValueError, match="retrieval reads the images' detected regions"):
        check_inputs(patches, task_of("retrieval"), "IMAGES", "")             # ITM's first stage: the tags
