"""Logging set-up: one line per event, as text or JSON; lines that can repeat per packet
are rate limited per message template (:class:`RepeatFilter`)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


#: Lines per second let through per message template.
REPEATS_PER_SECOND = 10
#: Templates tracked at once; templates are code constants, this only bounds odd callers.
_MAX_TEMPLATES = 1000


class RepeatFilter(logging.Filter):
    """At most ``per_second`` records per message template (``record.msg``, before its
    arguments are filled in) in any one-second window; the next record of a template that
    passes after some were dropped says how many ("(N similar lines suppressed)").

    A warning or traceback logged per packet would otherwise let any client fill the disk
    and spend the CPU on logging. The verdict is stored on the record, so the filter may
    sit on several loggers and a handler without counting a record twice.
    """

    def __init__(self, per_second: int = REPEATS_PER_SECOND) -> None:
        super().__init__()
        self.per_second = per_second
        #: template -> [window start, lines let through in it, lines suppressed since]
        self.state: dict[object, list[float]] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        verdict = record.__dict__.get("_repeat_verdict")
        if verdict is not None:
            return verdict
        now = time.monotonic()
        key = record.msg if isinstance(record.msg, str) else type(record.msg)
        st = self.state.get(key)
        if st is None:
            if len(self.state) >= _MAX_TEMPLATES:
                self.state.clear()
            st = self.state[key] = [now, 0, 0]
        if now - st[0] >= 1.0:
            st[0], st[1] = now, 0
        if st[1] >= self.per_second:
            st[2] += 1
            self.suppressed += 1
            record._repeat_verdict = False
            return False
        st[1] += 1
        if st[2]:
            record.msg = f"{record.getMessage()} ({int(st[2])} similar lines suppressed)"
            record.args = None
            st[2] = 0
        record._repeat_verdict = True
        return True


#: The one filter of the process: shared so that a template is counted once, whichever
#: logger or handler sees it first.
REPEATS = RepeatFilter()


def limit_repeats(prefix: str = "sidecar") -> RepeatFilter:
    """Put :data:`REPEATS` on the ``prefix`` logger and every logger under it that exists
    now (a logger's filters apply only to records logged on it, not to its children's).

    ``setup_logging`` covers the process through its handler; this covers in-process
    sidecars (tests, embedders) whose records go to handlers of their own. Idempotent;
    starts the counts afresh, so one sidecar's storm does not mute the next one's lines.
    """
    REPEATS.state.clear()
    names = [prefix] + [n for n in logging.Logger.manager.loggerDict
                        if n.startswith(prefix + ".")]
    for name in names:
        logger = logging.getLogger(name)
        if REPEATS not in logger.filters:
            logger.addFilter(REPEATS)
    return REPEATS


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger to write to stderr, repeats rate limited."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(REPEATS)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
