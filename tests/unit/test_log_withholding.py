"""An exception's text never reaches a log at INFO or above (design promise 6).

``log.exception`` in a worker's supervision, the MLLP listener or a delivery hook, and
faust's or asyncio's own error logs, print a traceback; its last line is the exception's
text, which can carry what the code was handling (a patient identifier, an HL7 field). The
record factory installed by ``configure_logging`` keeps the frames and the types and
withholds the text, for every formatter that prints the record: the plain and JSON ones
of this service and faust's (mode's) text formatters. A DEBUG log prints the text.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from mode.utils.logging import DefaultFormatter, ExtensionFormatter

from monitor.logs import JsonFormatter, WITHHELD, configure_logging, make_formatter, withheld_traceback
from monitor.worker import Hosted

PID = "PAT-7c1e93f0aa"
MRN = "MRN-55120931"
DOB = "".join(("2024", "0230"))  # built at run time: a traceback shows source lines, never values


@pytest.fixture
def root_logging():
    """configure_logging replaces the root handlers and the record factory: put them back."""
    root = logging.getLogger()
    handlers, level, factory = root.handlers[:], root.level, logging.getLogRecordFactory()
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.setLogRecordFactory(factory)


def capture(root: logging.Logger, formatter: logging.Formatter, level: str = "INFO") -> io.StringIO:
    configure_logging(level)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root.handlers[:] = [handler]
    return out


def parse_hl7_birth_date(field: str) -> None:
    raise ValueError(f"bad date of birth in PID-7 {field!r} for {PID}")


def failing_lookup() -> None:
    try:
        parse_hl7_birth_date(DOB)
    except ValueError as exc:
        err = KeyError(MRN)
        err.add_note(f"patient {PID}")
        raise err from exc


FORMATTERS = {
    "plain": lambda: make_formatter("text"),
    "json": JsonFormatter,
    "faust text": lambda: DefaultFormatter("[%(asctime)s] [%(process)s] [%(levelname)s] %(message)s %(extra)s"),
    "faust coloured": lambda: ExtensionFormatter(stream=io.StringIO(), fmt="%(log_color)s%(message)s"),
}


@pytest.mark.parametrize("name", sorted(FORMATTERS))
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL])
def test_a_traceback_at_info_or_above_keeps_frames_and_types_not_text(root_logging, name, level):
    out = capture(root_logging, FORMATTERS[name]())
    try:
        failing_lookup()
    except KeyError:
        logging.getLogger("monitor.test").log(level, "lookup failed", exc_info=True)
    text = out.getvalue()
    assert PID not in text and MRN not in text and "20240230" not in text
    if name == "json":
        text = json.loads(text)["exc_info"]
    # what an operator needs to find the bug is there: both exceptions, where they were raised
    assert "ValueError: " + WITHHELD in text and "KeyError: " + WITHHELD in text
    assert "parse_hl7_birth_date" in text and "failing_lookup" in text
    assert "direct cause" in text
    assert text.index("ValueError") < text.index("KeyError")  # the oldest first, as Python prints them


def test_a_debug_log_prints_the_text(root_logging):
    out = capture(root_logging, make_formatter("text"), level="DEBUG")
    try:
        failing_lookup()
    except KeyError:
        logging.getLogger("monitor.test").exception("lookup failed")
    assert PID in out.getvalue() and WITHHELD not in out.getvalue()


def test_the_context_of_an_exception_is_withheld_too():
    try:
        try:
            {}[PID]
        except KeyError:
            raise RuntimeError(f"while judging {PID}")
    except RuntimeError as exc:
        text = withheld_traceback(exc)
    assert PID not in text
    assert "another exception occurred" in text
    assert text.count(WITHHELD) == 2


def test_an_exception_of_a_module_is_named_with_its_module():
    class Refused(Exception):
        pass

    Refused.__module__ = "monitor.clinical.runner"
    text = withheld_traceback(Refused(PID))
    assert text == f"monitor.clinical.runner.{Refused.__qualname__}: {WITHHELD}"


def test_a_worker_loop_that_fails_on_a_patient_logs_no_identifier(root_logging):
    """The worker's supervision (``Hosted``) logs a failed loop with ``log.exception``."""
    out = capture(root_logging, make_formatter("text"))

    class Loop:
        runs = 0

        async def run(self) -> None:
            Loop.runs += 1
            if Loop.runs == 1:
                raise LookupError(f"no state for patient {PID}")
            await asyncio.sleep(10)

        async def stop(self) -> None:
            pass

    async def go():
        hosted = Hosted(Loop(), "test-loop-withheld")
        hosted.restart_delay = 0.01
        await hosted.start()
        for _ in range(200):
            if Loop.runs >= 2:
                break
            await asyncio.sleep(0.01)
        await hosted.stop()

    asyncio.run(go())
    text = out.getvalue()
    assert "test-loop-withheld loop stopped" in text and "LookupError: " + WITHHELD in text
    assert PID not in text


def test_an_exception_passed_as_an_argument_is_printed_as_its_type(root_logging):
    """mode's ``Crashed reason=%r`` and ``Error: %r``, faust's callbacks."""
    out = capture(root_logging, make_formatter("text"))
    logging.getLogger("mode.services").error("Crashed reason=%r", LookupError(PID))
    logging.getLogger("monitor.test").warning("count %d, name %s", 3, "ingest")
    text = out.getvalue()
    assert PID not in text
    assert f"Crashed reason=LookupError({WITHHELD})" in text
    assert "count 3, name ingest" in text  # other arguments as they are


def test_an_unretrieved_task_exception_keeps_asyncio_line_not_the_task(root_logging):
    """asyncio's default handler puts the task's repr, with the exception's text, in the message."""
    out = capture(root_logging, make_formatter("text"))

    async def judge() -> None:
        raise LookupError(f"no state for patient {PID}")

    async def go():
        task = asyncio.get_running_loop().create_task(judge())
        await asyncio.sleep(0.01)
        assert task.done()
        del task  # never retrieved: the loop's handler logs it when the task is collected

    asyncio.run(go())
    import gc
    gc.collect()
    text = out.getvalue()
    assert "Task exception was never retrieved" in text
    assert "LookupError: " + WITHHELD in text
    assert PID not in text


def test_the_kafka_clients_errors_keep_their_text(root_logging):
    """Their text names brokers, topics and error codes, which operations need; never a record."""
    from aiokafka.errors import GroupCoordinatorNotAvailableError, KafkaConnectionError

    out = capture(root_logging, make_formatter("text"))
    logging.getLogger("aiokafka.consumer.group_coordinator").error(
        "Group Coordinator Request failed: %r", GroupCoordinatorNotAvailableError())
    try:
        try:
            raise KafkaConnectionError("Unable to connect to 127.0.0.1:9092")
        except KafkaConnectionError as exc:
            raise LookupError(PID) from exc
    except LookupError:
        logging.getLogger("monitor.test").exception("loop stopped")
    text = out.getvalue()
    assert f"Group Coordinator Request failed: {GroupCoordinatorNotAvailableError()!r}" in text
    assert WITHHELD not in text.splitlines()[0]
    assert "KafkaConnectionError: Unable to connect to 127.0.0.1:9092" in text
    assert "LookupError: " + WITHHELD in text and PID not in text
