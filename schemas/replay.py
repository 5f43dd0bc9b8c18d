"""The dead-letter replay ledger record (topic ``dead-letter-replays``, written by ``monitor dlq replay``)."""
from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict


class ReplayLedgerEntry(BaseModel):
    """One replayed dead letter, keyed by its coordinates ``<dead-letter topic>/<partition>/<offset>``.

    The ledger topic is compacted: the latest entry per key says the dead letter was
    replayed, where to, and when; ``monitor dlq replay`` never republishes it again.
    """

    model_config = ConfigDict(extra="ignore")

    dead_letter: str
    #: the dead letter's own record time: tells it apart from a record at the same offset of a re-created topic
    dead_lettered_at: AwareDatetime
    reason: str
    replayed_to: str
    partition: int
    offset: int
    replayed_at: AwareDatetime
