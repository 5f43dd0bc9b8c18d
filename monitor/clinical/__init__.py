"""The clinical stage: a pure processor over a patient store, and its aiokafka runner."""
