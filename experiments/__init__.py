"""The paper's experiments; run from a checkout as ``python -m experiments.<study>``."""
