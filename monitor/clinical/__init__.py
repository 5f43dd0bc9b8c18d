"""The clinical stage: a pure processor over a patient store, and its aiokafka runner."""
from alerts.compiled_core import install as _install_compiled_core

# the processor and the store are compiled with the alerts core (alerts.compiled_core)
_install_compiled_core()
