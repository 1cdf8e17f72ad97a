"""A pickle payload for the safe-loading tests: unpickling it creates the file ``marker``."""

from __future__ import annotations


class Planted:
    """Unpickled, calls ``open(marker, "w")``: the marker file shows that the pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
