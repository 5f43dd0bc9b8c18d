"""alerts: the clinical rules, the engine and the alert lifecycle (pure: no Kafka, no Faust)."""
from alerts.compiled_core import install as _install_compiled_core

# the compiled builds of the hot modules, where built from their exact source (compiled_core)
_install_compiled_core()
