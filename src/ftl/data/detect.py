"""data.format auto: the format of a source from the columns of its first rows.

A format fits a row when the row has its identifying columns (formats/: FORMATS[...].columns). Of the
formats that fit, one whose columns include another's wins (prompt+completion over prompt); a bare text or
prompt column counts only when nothing else fits. Layouts ftl knows but does not train on (TRL's unpaired
preference and stepwise supervision) are named rather than read as something else. Every row looked at must
give the same answer; no answer, two answers or rows that disagree are a named error.
"""

from __future__ import annotations

from typing import Any

from ftl.data.formats import FORMATS, describe_formats
from ftl.errors import DataError

ROWS_LOOKED_AT = 8

# TRL formats ftl refuses by name rather than misread (a prompt+completion+label row is not SFT data)
UNSUPPORTED = {"unpaired preference (TRL's KTO format)": ("prompt", "completion", "label"),
               "stepwise supervision": ("prompt", "completions", "labels")}


def formats_fitting(columns: set[str]) -> list[str]:
    signatures = {name: set(info.columns) for name, info in FORMATS.items()}
    signatures.update({name: set(cols) for name, cols in UNSUPPORTED.items()})
    fits = [name for name, needed in signatures.items() if needed <= columns]
    strong = [name for name in fits if name in UNSUPPORTED or not FORMATS[name].fallback] or fits
    return [name for name in strong if not any(signatures[name] < signatures[other] for other in strong)]


def detect_format(head: list[tuple[str, Any]], key: str) -> tuple[str, str]:
    """(format, what to tell the user) from the first rows of one source; `key` names it in messages."""
    rows = [(location, row) for location, row in head if isinstance(row, dict)][:ROWS_LOOKED_AT]
    if not rows:
        raise DataError(f"{key}: data.format auto found no readable row to tell the format from "
                        f"({head[0][0]}: {head[0][1]}); set data.format")
    answers = []
    for location, row in rows:
        fits = formats_fitting(set(row))
        if len(fits) != 1:
            seen = ", ".join(sorted(row)) or "none"
            problem = f"fits several formats ({', '.join(fits)})" if fits else "fits none of the formats"
            raise DataError(f"{location}: data.format auto: a row with columns [{seen}] {problem}; set data.format "
                            f"(or data.columns to rename columns). Formats known: {describe_formats()}")
        if fits[0] in UNSUPPORTED:
            raise DataError(f"{location}: data.format auto: columns [{', '.join(sorted(row))}] are {fits[0]}, "
                            f"which ftl does not train on. Formats known: {describe_formats()}")
        answers.append((location, fits[0]))
    if len({fmt for _, fmt in answers}) > 1:
        first, other = answers[0], next(a for a in answers if a[1] != answers[0][1])
        raise DataError(f"{key}: data.format auto: rows disagree ({first[0]} is {first[1]}, {other[0]} is "
                        f"{other[1]}); set data.format")
    fmt, row = answers[0][1], rows[0][1]
    info = FORMATS[fmt]
    variant = info.describe(row)
    used = [c for c in info.columns + info.optional if c in row]
    ignored = sorted(set(row) - set(used))
    said = (f"{fmt}{f' ({variant})' if variant else ''} from columns {', '.join(used)}"
            + (f" (ignored: {', '.join(ignored)})" if ignored else ""))
    return fmt, said
