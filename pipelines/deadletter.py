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
