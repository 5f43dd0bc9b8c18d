"""Stream processors: ingest (validate + normalise) and the per-patient clinical agent."""
from . import ingest  # noqa: F401
from . import clinical  # noqa: F401
