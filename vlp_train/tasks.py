"""The pre-training tasks (granularities): one name each, used by the loader's views, the
objectives, the curriculum and the log keys (`rt/mlm`, ...)."""
from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    REGION_TAG = "rt"        # [tags] + regions: tag MLM, MRC, MRFR
    REGION_PHRASE = "rp"     # [retrieved sentence] + regions, linked items masked: phrase MLM, p-MRTC
    IMAGE_SENTENCE = "is"    # [sentence] + regions: ITM, MLM


TASKS = tuple(Task)

IGNORE = -100  # a label the loss skips (cross-entropy's ignore_index): the loader writes it, the objectives read it
