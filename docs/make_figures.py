"""Regenerate the figures embedded in the docs from the digits studies.

    python docs/make_figures.py

Runs (or resumes) the main job (both digits studies, two seeds) into runs/ and copies two of its
figures into docs/_static/figures/. The committed PNGs come from this command.
"""

from __future__ import annotations

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from experiments import __main__ as main_job  # noqa: E402

FIGURES = {
    ("regularize-digits", "conv_linear_norms.png"): "digits_conv_linear_norms.png",
    ("adversarial-digits", "layer_norms_small.png"): "digits_adversarial_layer_norms.png",
}


def main() -> None:
    root = os.path.join(os.path.dirname(HERE), "runs")
    main_job.main(["--out", root])
    target = os.path.join(HERE, "_static", "figures")
    os.makedirs(target, exist_ok=True)
    for (study, name), copy in FIGURES.items():
        shutil.copyfile(os.path.join(root, study, name), os.path.join(target, copy))
        print("wrote", os.path.join(target, copy))


if __name__ == "__main__":
    main()
