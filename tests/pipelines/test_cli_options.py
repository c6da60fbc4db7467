"""`vlp-data`'s flags take their defaults from pipelines/options.py, and the detector's flags are
defined once for every command that has them."""
import json
import os

import click
import pytest
from click.testing import CliRunner

from pipelines import build, cli
from pipelines.cli import FieldOption, main
from pipelines.options import INDEX_TYPES, BuildOptions, DetectOptions, RetrieveOptions, ShardOptions, field_default

from .conftest import write_jsonl

COMMANDS = ("build-retrieval", "detect", "convert-detections")
# Options with a default of their own, not a stage setting: the run's own switches.
NOT_SETTINGS = {"overwrite", "wait"}
NO_DEFAULT = (None, getattr(click.core, "UNSET", None))  # click >= 8.3 marks a flag given no default UNSET


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_flag_takes_its_default_from_the_options_dataclasses(command):
    """A flag with a default (other than an off switch or none) is a FieldOption, and its default
    is its field's: a default written in cli.py as a literal fails here."""
    checked = 0
    for param in main.commands[command].params:
        if param.name in NOT_SETTINGS or param.default in NO_DEFAULT or (getattr(param, "is_flag", False)
                                                                          and param.default is False):
            continue
        assert isinstance(param, FieldOption), f"{command} {param.opts[0]}: default {param.default!r} written in cli.py"
        assert param.default == field_default(param.owner, param.field), param.opts[0]
        checked += 1
    assert checked >= {"build-retrieval": 15, "detect": 6, "convert-detections": 2}[command]


def _inputs(tmp_path):
    detections = write_jsonl(tmp_path / "det.jsonl", [])
    text = tmp_path / "text.txt"
    text.write_text("A cat sleeps on a sofa.\n")
    return detections, str(text)


def test_build_retrieval_without_settings_builds_the_default_options(tmp_path, monkeypatch):
    """Every default, and every flag's way into BuildOptions: no flags give BuildOptions' defaults."""
    built = []
    monkeypatch.setattr(cli, "run_build", lambda options, beam_args, wait=True: built.append(options))
    detections, text = _inputs(tmp_path)
    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", detections, "--text", text, "--output", out])
    assert result.exit_code == 0, result.output
    assert built == [BuildOptions(output=out, detections=detections, text=text)]


def test_detect_and_convert_without_settings_use_the_default_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(build, "build_detect_pipeline", lambda *args: calls.append(("detect", *args)))
    monkeypatch.setattr(build, "build_convert_detections_pipeline", lambda *args: calls.append(("convert", *args)))
    monkeypatch.setattr(cli, "_run_detections_job", lambda *args: None)
    detections, _ = _inputs(tmp_path)
    for args in (["detect", "--images", detections], ["convert-detections", "--detections", detections]):
        result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
    (_, _, _, detector, _, per_file), (_, _, _, max_regions, _, per_file_converted) = calls
    assert detector == DetectOptions()
    assert max_regions == DetectOptions().max_regions
    assert per_file == per_file_converted == ShardOptions().detections_per_file


def _detector_flags(command):
    return {p.opts[0]: (p.default, p.help, p.type.to_info_dict()) for p in main.commands[command].params
            if isinstance(p, FieldOption) and p.owner is DetectOptions}


def test_the_detector_flags_are_one_definition_in_every_command():
    retrieval, detect = _detector_flags("build-retrieval"), _detector_flags("detect")
    assert set(retrieval) == {"--max-regions", "--conf-threshold", "--nms-threshold", "--detector-cfg",
                              "--detector-weights", "--detector-names"}
    assert set(detect) == set(retrieval) | {"--regions", "--grid-size"}
    assert {flag: detect[flag] for flag in retrieval} == retrieval
    assert _detector_flags("convert-detections") == {"--max-regions": retrieval["--max-regions"]}


def test_detector_flags_reach_the_detector_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(build, "build_detect_pipeline", lambda *args: calls.append(args[2]))
    monkeypatch.setattr(cli, "_run_detections_job", lambda *args: None)
    files = {}
    for name in ("cfg", "weights", "names"):
        files[name] = str(tmp_path / f"model.{name}")
        open(files[name], "w").close()
    base = ["detect", "--images", str(tmp_path / "*.jpg"), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*base, "--max-regions", "12", "--conf-threshold", "0.1", "--nms-threshold", "0.6",
                                       "--regions", "grid", "--grid-size", "2", "--detector-cfg", files["cfg"],
                                       "--detector-weights", files["weights"], "--detector-names", files["names"]])
    assert result.exit_code == 0, result.output
    assert calls == [DetectOptions(conf_threshold=0.1, nms_threshold=0.6, max_regions=12, regions="grid", grid_size=2,
                                   cfg=files["cfg"], weights=files["weights"], names=files["names"])]

    # half a model of one's own would silently run the bundled detector: refused
    result = CliRunner().invoke(main, [*base, "--detector-cfg", files["cfg"]])
    assert result.exit_code == 2 and ("needs its cfg, weights and names files (--detector-cfg, --detector-weights, "
                                      "--detector-names); only cfg given") in result.output
    result = CliRunner().invoke(main, [*base, "--regions", "grid", "--grid-size", "6", "--max-regions", "36"])
    assert result.exit_code == 2 and "makes 37 regions an image, more than max_regions=36 (--max-regions 36)" in result.output
    assert len(calls) == 1


def test_the_flex_template_offers_the_index_types_the_cli_takes():
    import re
    metadata = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "flex-template-metadata.json")
    with open(metadata, encoding="utf-8") as f:
        (index,) = [p for p in json.load(f)["parameters"] if p["name"] == "index"]
    (pattern,) = index["regexes"]
    assert [t for t in (*INDEX_TYPES, "hnsw", "") if re.fullmatch(pattern, t)] == list(INDEX_TYPES)


def test_no_inputs_build_the_bundled_sample_with_the_same_settings(tmp_path, monkeypatch):
    """`make demo`'s command: the sample's images and text replace the inputs, its text is split into
    sentences, every flag given still applies."""
    from pipelines import sample

    built = []
    monkeypatch.setattr(cli, "run_build", lambda options, beam_args, wait=True: built.append(options))
    # the sample's files themselves are the end-to-end test's (test_cli_default_and_detect)
    monkeypatch.setattr(sample, "prepare_sample", lambda folder: (f"{folder}/images/*.jpg", f"{folder}/text.txt"))
    out = str(tmp_path / "vlp-out")
    result = CliRunner().invoke(main, ["build-retrieval", "--k", "4", "--output", out, "--samples-per-shard", "25"])
    assert result.exit_code == 0, result.output
    (options,) = built
    assert options.images and options.text and options.images.startswith(os.path.join(out, ".sample-input"))
    assert options.text_options.split_sentences and options.retrieve.k == 4 and options.shard.samples_per_shard == 25
    assert options == BuildOptions(output=out, images=options.images, text=options.text,
                                   text_options=options.text_options, retrieve=options.retrieve, shard=options.shard)


def test_corpus_cache_gb_reaches_the_search_options_and_refuses_zero(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(cli, "run_build", lambda options, beam_args, wait=True: built.append(options))
    detections, text = _inputs(tmp_path)
    args = ["build-retrieval", "--detections", detections, "--text", text, "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--corpus-cache-gb", "7.5"])
    assert result.exit_code == 0, result.output
    assert built[0].retrieve.corpus_cache_gb == 7.5
    result = CliRunner().invoke(main, [*args, "--corpus-cache-gb", "0"])
    assert result.exit_code == 2 and "--corpus-cache-gb" in result.output


@pytest.mark.parametrize("cap", [0, -1.5, float("nan"), float("inf"), "10"])
def test_a_corpus_cache_cap_out_of_range_from_code_is_refused_naming_the_field_and_the_flag(cap):
    """RetrieveOptions owns the cap's range: code that builds the options gets the CLI's error,
    not "more than the cap of 0 bytes" from every worker's first copy."""
    with pytest.raises(ValueError, match=r"corpus_cache_gb=.* \(--corpus-cache-gb .*\): GiB .* more than 0"):
        RetrieveOptions(corpus_cache_gb=cap)
    assert RetrieveOptions(corpus_cache_gb=0.25).corpus_cache_gb == 0.25 and RetrieveOptions().corpus_cache_gb is None
