"""(b) of the benchmark: a bare faust passthrough with the service's faust settings.

Raw bytes in (the service's input topics), forwarded unchanged to one output topic by one
agent; memory store. The ``faust.App`` keyword arguments are read from the
``faust.App(...)`` call in ``monitor/app.py`` (evaluated with the service's settings), so
this app keeps the service's settings as that file changes; only the app id comes from
``MONITOR_APP_ID`` like the service.

Environment: the service's (``KAFKA_BOOTSTRAP_SERVERS``, ``MONITOR_APP_ID``, ``WEB_PORT``,
``DATA_DIR``, ``TOPIC_PARTITIONS``) plus ``BENCH_IN_TOPICS`` (comma-separated) and
``BENCH_OUT_TOPIC``; ``BENCH_FAUST_OVERRIDES`` (a JSON object of faust settings) is for
experiments by hand and is never set by ``run_all.py``.

    python bench/bare_faust.py worker -l warning
"""
from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import faust  # noqa: E402

from monitor.kafka_config import broker_url, faust_credentials  # noqa: E402
from monitor.settings import get_settings  # noqa: E402

settings = get_settings()

#: used only when monitor/app.py cannot be read: its settings at the time of writing
_FALLBACK = dict(
    broker=broker_url(settings), broker_credentials=faust_credentials(settings), store=settings.table_store,
    datadir=settings.data_dir, topic_partitions=settings.topic_partitions,
    topic_replication_factor=settings.topic_replication_factor, topic_allow_declare=True,
    topic_disable_leader=True, web_enabled=True, web_host=settings.web_host, web_port=settings.web_port,
    web_bind=settings.web_host, web_tables_enabled=False, web_in_thread=False,
    consumer_auto_offset_reset="earliest", producer_acks=-1, processing_guarantee="at_least_once",
    table_standby_replicas=0, autodiscover=False, broker_max_poll_interval=300.0, stream_wait_empty=False,
    producer_linger=0.005, producer_max_batch_size=512 * 1024,
    producer_max_request_size=settings.max_message_bytes, consumer_max_fetch_size=settings.max_message_bytes,
)


def service_app_kwargs(path: Path = ROOT / "monitor" / "app.py") -> tuple[dict, str]:
    """The keyword arguments of ``faust.App(...)`` in monitor/app.py, evaluated here."""
    try:
        tree = ast.parse(path.read_text())
        ns = {"settings": settings, "broker_url": broker_url, "faust_credentials": faust_credentials,
              "faust": faust}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "App"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "faust"):
                kwargs = {}
                for kw in node.keywords:
                    if kw.arg is None:
                        raise ValueError("**kwargs in faust.App call")
                    kwargs[kw.arg] = eval(compile(ast.Expression(kw.value), str(path), "eval"), ns)  # noqa: S307
                return kwargs, "monitor/app.py"
        raise ValueError("no faust.App(...) call")
    except Exception as exc:  # keep the benchmark running with the last known settings
        print(f"bare_faust: using fallback settings ({type(exc).__name__}: {exc})", file=sys.stderr)
        return dict(_FALLBACK), "fallback"


APP_KWARGS, APP_KWARGS_FROM = service_app_kwargs()
#: for experiments only (run_all.py never sets it): JSON object of faust settings to override
APP_KWARGS.update(json.loads(os.environ.get("BENCH_FAUST_OVERRIDES") or "{}"))

app = faust.App(settings.app_id, **APP_KWARGS)


def _raw(*names: str) -> faust.TopicT:
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=settings.topic_partitions, internal=False)


IN_TOPICS = [t for t in os.environ.get("BENCH_IN_TOPICS", "").split(",") if t]
OUT_TOPIC = os.environ.get("BENCH_OUT_TOPIC", "")
if not IN_TOPICS or not OUT_TOPIC:
    raise SystemExit("set BENCH_IN_TOPICS and BENCH_OUT_TOPIC")

source = _raw(*IN_TOPICS)
sink = _raw(OUT_TOPIC)


@app.agent(source)
async def passthrough(stream):
    async for event in stream.events():
        msg = event.message
        await sink.send(key=msg.key, value=msg.value)


if __name__ == "__main__":
    app.main()
