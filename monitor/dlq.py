"""Dead-letter publishing: the original bytes plus reason headers."""
from __future__ import annotations

from datetime import datetime

from schemas.errors import Reason

from .metrics import DEAD_LETTERS

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


async def send_dead_letter(dlq_topic, raw: bytes | None, key: bytes | None, reason, message, topic, partition, offset, received_at):
    DEAD_LETTERS.labels(topic=topic, reason=reason.value if isinstance(reason, Reason) else str(reason)).inc()
    # force: produce now rather than at the next offset commit (faust "attachments");
    # faust flushes the producer before it commits, so at-least-once still holds
    await dlq_topic.send(
        key=key,
        value=raw if raw is not None else b"",
        headers=dead_letter_headers(reason, message, topic, partition, offset, received_at),
        force=True,
    )
