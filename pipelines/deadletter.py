"""The dead-letter convention: bad records go to a tagged output, then to OUTPUT/rejected/.

A dead letter says why with two parts: `reason`, a stable class that names the fault and never a
value, index, id or path (stats.json and the Beam counters count by it: one key per kind of
fault, however many records), and `detail`, the particulars of this record (which field, value,
box, image id, the exception's text), kept in the dead letter only.
"""
from __future__ import annotations

import json

import apache_beam as beam

REJECTED = "rejected"  # the tag of every stage's dead-letter output
COUNTS = "counts"  # the tag of a stage's (counter name, n) pairs that end up in stats.json
_MAX_RECORD_CHARS = 2000
DUPLICATE = "duplicate image_id"


class Rejected(ValueError):
    """A record's fault as a reason class plus a detail (see the module); its text is
    'reason: detail', as a plain ValueError's message would read."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def reason_of(err: BaseException, reason: str) -> tuple[str, str | None]:
    """(reason class, detail) of an exception that rejects a record: a `Rejected` says both;
    any other is of class `reason`, its text the detail."""
    if isinstance(err, Rejected):
        return err.reason, err.detail
    return reason, str(err) or type(err).__name__


def rejection(stage: str, source: str, reason: str, record=None, detail: str | None = None) -> beam.pvalue.TaggedOutput:
    """A dead-letter element: which stage, where (file[:line] or image id), why (`reason`, a stable
    class without values, and `detail`), and the record."""
    if ":" in reason:  # a value after a colon in the class would make one stats key per record
        raise ValueError(f"a dead letter's reason is a stable class without a colon; put {reason!r}'s particulars "
                         f"in its detail")
    if record is not None and not isinstance(record, str):
        try:
            record = json.dumps(record, default=repr, ensure_ascii=False)
        except (TypeError, ValueError):
            record = repr(record)
    if record is not None and len(record) > _MAX_RECORD_CHARS:
        record = record[:_MAX_RECORD_CHARS] + "...(truncated)"
    beam.metrics.Metrics.counter("rejected", f"{stage}: {reason}").inc()
    return beam.pvalue.TaggedOutput(REJECTED, {"stage": stage, "source": source, "reason": reason, "detail": detail,
                                               "record": record})


def message(dead_letter: dict) -> str:
    """A dead letter's reason and detail as one line: 'reason: detail'."""
    detail = dead_letter.get("detail")
    return f"{dead_letter['reason']}: {detail}" if detail else dead_letter["reason"]


def rejection_for(stage: str, source: str, err: BaseException, reason: str, record=None) -> beam.pvalue.TaggedOutput:
    """The dead letter of a record that raised `err` (`reason`: the class when `err` names none)."""
    reason, detail = reason_of(err, reason)
    return rejection(stage, source, reason, record, detail)


def duplicate_rejection(stage: str, source: str, image_id: str, kept_where: str, what: str = "",
                        record=None) -> beam.pvalue.TaggedOutput:
    """The dead letter of a duplicate image id: this record is at `source`, the kept one at
    `kept_where`, so both occurrences are named (in the detail; the reason is the same for all)."""
    return rejection(stage, source, DUPLICATE, record,
                     f"{image_id!r}{f' in {what}' if what else ''} also at {kept_where}, which is kept")
