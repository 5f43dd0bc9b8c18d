"""Dead-letter publishing: the original bytes plus reason headers."""
from __future__ import annotations

from datetime import datetime

from schemas.errors import Reason


MAX_HEADER_MESSAGE = 1000


def dead_letter_headers(
    reason: Reason | str, message: str, topic: str, partition: int | None, offset: int | None, received_at: datetime
) -> list[tuple[str, bytes]]:
    reason_s = reason.value if isinstance(reason, Reason) else str(reason)
    return [
        ("dlq.reason", reason_s.encode()),
        ("dlq.message", message[:MAX_HEADER_MESSAGE].encode("utf-8", "replace")),
        ("dlq.source.topic", topic.encode()),
        ("dlq.source.partition", b"" if partition is None else str(partition).encode()),
        ("dlq.source.offset", b"" if offset is None else str(offset).encode()),
        ("dlq.received_at", received_at.isoformat().encode()),
    ]
