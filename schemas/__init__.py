"""The wire contract: canonical observations, input events, alerts, and format adapters.

Pure Python and pydantic; nothing here imports Kafka or Faust.
"""
from .errors import Reason, Rejected
from .events import (
    DoseEvent,
    LabResult,
    LiverFunctionPanel,
    Observation,
    ReferenceRange,
    ResultStatus,
    SteroidEvent,
    VitalSign,
)

__all__ = [
    "Reason", "Rejected", "DoseEvent", "LabResult", "LiverFunctionPanel", "Observation",
    "ReferenceRange", "ResultStatus", "SteroidEvent", "VitalSign",
]
