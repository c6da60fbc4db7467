"""Folders both halves write that a user may point elsewhere: a report's folder is replaced whole
on each run, so only one we wrote (it holds our marker) or an empty one is replaced."""
from __future__ import annotations

import os
import shutil

REPORT_MARKER = ".vlp-report"


def replace_report_folder(out_dir: str, source: str, overwrite: bool = False) -> None:
    """Empty `out_dir` for a new report of `source` (a corpus or run folder) and mark it. ValueError
    when it is `source` or holds it, or is a non-empty folder (or a file) we did not write, unless
    `overwrite` (never for the first case)."""
    out, src = os.path.realpath(out_dir), os.path.realpath(source)
    if out == src or src.startswith(out.rstrip(os.sep) + os.sep):
        raise ValueError(f"--out {out_dir} is {source} or holds it: a report folder is replaced whole; "
                         f"choose a folder of its own (e.g. {os.path.join(source, 'report')})")
    if os.path.exists(out_dir):
        ours = os.path.isfile(os.path.join(out_dir, REPORT_MARKER))
        empty = os.path.isdir(out_dir) and not os.listdir(out_dir)
        if not (ours or empty or overwrite):
            raise ValueError(f"--out {out_dir} exists and is not a report folder written by vlp (no {REPORT_MARKER} "
                             "in it): its files would be deleted. Choose another folder, or pass --overwrite")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        else:
            os.remove(out_dir)
    os.makedirs(out_dir)
    open(os.path.join(out_dir, REPORT_MARKER), "w").close()
