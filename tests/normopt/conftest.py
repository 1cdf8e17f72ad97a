"""Fixtures of the normopt tests."""

import pytest
from helpers import rings_everywhere


@pytest.fixture
def rings():
    """Rings of recent slices on every layer they can serve (rows: l_inf norms), however small."""
    with rings_everywhere():
        yield
