"""The dead-letter convention: bad records go to a tagged output, then to OUTPUT/rejected/."""
from __future__ import annotations

import json

import apache_beam as beam

REJECTED = "rejected"  # the tag of every stage's dead-letter output
_MAX_RECORD_CHARS = 2000


def rejection(stage: str, source: str, reason: str, record=None) -> beam.pvalue.TaggedOutput:
    """A dead-letter element: which stage, where (file[:line] or image id), why, and the record."""
    if record is not None and not isinstance(record, str):
        try:
            record = json.dumps(record, default=repr, ensure_ascii=False)
        except (TypeError, ValueError):
            record = repr(record)
    if record is not None and len(record) > _MAX_RECORD_CHARS:
        record = record[:_MAX_RECORD_CHARS] + "...(truncated)"
    beam.metrics.Metrics.counter("rejected", f"{stage}: {reason.split(':')[0]}").inc()
    return beam.pvalue.TaggedOutput(REJECTED, {"stage": stage, "source": source, "reason": reason, "record": record})


def duplicate_reason(image_id: str, kept_where: str, what: str = "") -> str:
    """The reason of a dead-lettered duplicate: the reader's record is at the dead letter's source,
    the kept one at `kept_where`, so both occurrences are named. The words before the colon are the
    same for every duplicate: stats.json counts them as one reason."""
    return f"duplicate image_id: {image_id!r}{f' in {what}' if what else ''} also at {kept_where}, which is kept"
