"""A report's --out is replaced whole: only an earlier report's folder or an empty one, never a
user's folder (without --overwrite) nor the corpus or run it reports on; errors in one line."""
import os
from pathlib import Path

from click.testing import CliRunner

from pipelines.cli import main as data_main
from schemas.corpus import PUBLISH_JOURNAL, STAGING
from schemas.folders import REPORT_MARKER
from vlp_train.cli import main as train_main


def test_a_users_folder_is_not_replaced_without_overwrite(run_folder, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(train_main, ["report", str(run_folder), "--out", str(mine)])
    assert refused.exit_code == 1 and "--overwrite" in refused.output and "Traceback" not in refused.output
    assert (mine / "notes.txt").read_text() == "keep me"
    again = CliRunner().invoke(train_main, ["report", str(run_folder), "--out", str(tmp_path / "r")])
    assert again.exit_code == 0 and (tmp_path / "r" / REPORT_MARKER).exists()
    (tmp_path / "r" / "stale.html").write_text("old")
    assert CliRunner().invoke(train_main, ["report", str(run_folder), "--out", str(tmp_path / "r")]).exit_code == 0
    assert not (tmp_path / "r" / "stale.html").exists()  # an earlier report's folder is replaced whole
    forced = CliRunner().invoke(train_main, ["report", str(run_folder), "--out", str(mine), "--overwrite"])
    assert forced.exit_code == 0 and not (mine / "notes.txt").exists()


def test_the_reported_folder_itself_is_never_the_output(run_folder, corpus):
    out, run_folder = Path(corpus[0]), Path(run_folder)
    for main, source, target in ((train_main, run_folder, run_folder), (train_main, run_folder, run_folder.parent),
                                 (data_main, out, out)):
        result = CliRunner().invoke(main, ["report", str(source), "--out", str(target), "--overwrite"])
        assert result.exit_code == 1 and "holds it" in result.output, result.output
        assert os.path.isdir(source) and os.listdir(source)


def test_a_half_published_corpus_is_refused_in_one_line(corpus, tmp_path):
    out = Path(corpus[0])
    journal = out / STAGING / PUBLISH_JOURNAL
    journal.parent.mkdir(exist_ok=True)
    journal.write_text("{}")
    try:
        result = CliRunner().invoke(data_main, ["report", str(out), "--out", str(tmp_path / "r")])
    finally:
        journal.unlink()
    assert result.exit_code == 1 and "half-published" in result.output and "Traceback" not in result.output
