"""Fine-tuning a model that sees the images' pixels (model.visual patches or both): refused up
front, before any data is read, when the run has no images."""
import pytest
from transformers import BertTokenizerFast

from vlp_train.finetune.config import load_config

from .test_harness import DIM, TINY

PATCHES = ["model.image_size=32", "model.patch_size=8"]


def export_model(folder, arch: str, visual: str) -> str:
    """A tiny pre-trained model of `arch` seeing `visual`, saved as a run's hf/ export is."""
    from vlp_train.families import build_model
    from vlp_train.pretrained import bundled_minilm_path

    cfg = load_config("easy-vqa", TINY + PATCHES + [f"model.arch={arch}", f"model.visual={visual}"]
                      + (["model.vl_layers=1"] if arch == "vlmo" else []))
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
    with pytest.raises(ValueError, match=rf"model.init {folder} has model.visual={visual}: it needs the images' pixels"):
        train.build_finetune(cfg)


def test_a_fresh_pixel_model_without_images_is_refused(tmp_path):
    from vlp_train.finetune.train import build_finetune

    cfg = load_config("easy-vqa", TINY + PATCHES + ["model.visual=patches"])
    cfg.run.output, cfg.data.detections = str(tmp_path / "ft"), str(tmp_path / "none-*.parquet")
    with pytest.raises(ValueError, match=r"this run has model.visual=patches: it needs the images' pixels"):
        build_finetune(cfg)
