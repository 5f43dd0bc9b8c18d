"""YAML text to Python data, with libyaml's parser when PyYAML was built with it.

The shipped protocols (about 53 KB each) took 0.16-0.22 s each with PyYAML's pure-Python
parser and 0.02 s with libyaml's (``CSafeLoader``): the same data, compared on every file
the service loads (docs/measurements.md, fifteenth pass); every worker start loads both
protocols. The resolvers (which scalar becomes which type) are PyYAML's own in both. Text
that does not parse is parsed again with the pure-Python loader, whose messages show the
offending line."""
from __future__ import annotations

import yaml

_FAST = getattr(yaml, "CSafeLoader", None)


def safe_load(text: str):
    """``yaml.safe_load``, faster. Raises ``yaml.YAMLError`` with PyYAML's own message."""
    if _FAST is not None:
        try:
            return yaml.load(text, Loader=_FAST)  # noqa: S506 (CSafeLoader is the safe loader)
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)
