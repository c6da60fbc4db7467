"""The pre-training tasks (granularities): one name each, used by the loader's views, the
objectives, the curriculum and the log keys (`rt/mlm`, ...)."""
from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    REGION_TAG = "rt"        # [tags] + regions: tag MLM, MRC, MRFR
    REGION_PHRASE = "rp"     # [retrieved sentence] + regions, linked items masked: phrase MLM, p-MRTC
    IMAGE_SENTENCE = "is"    # [sentence] + regions: ITM, MLM
    # VLMo (model.arch=vlmo, vlp_train/families/vlmo.py)
    IMAGE_TEXT = "vl"        # image and retrieved sentence: ITC, ITM with global hard negatives, MLM on the fusion
    IMAGE_ONLY = "img"       # regions alone (the vision stage): masked region-feature regression
    TEXT_ONLY = "txt"        # text alone (the language stage): MLM


TASKS = tuple(Task)

IGNORE = -100  # a label the loss skips (cross-entropy's ignore_index): the loader writes it, the objectives read it
