"""wsi-qc: quality control of histopathology whole-slide images with the RL2 metric.

The API (see wsi_qc.api): `fit_reference`, `Scorer` (`.save`, `.load`, `.score_slide`), `fit_threshold`,
`qc_folder`, `load_config`. Heavy modules (torch, timm) load on first use, not on `import wsi_qc`.
"""

__version__ = "0.1.0"

import os

# torch's OpenMP threads wait for work without spinning, leaving the cores to OpenVINO's threads (the encoder's network,
# the flow) between torch's steps: spinning, the OpenVINO flow ran at 60 % speed in 3 of 6 runs of
# benchmarks/scoring.py, passive in none of 8 (fitting in torch is 5-10 % slower). OpenMP reads it when torch loads,
# so it holds when wsi_qc is imported first; a value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from wsi_qc.errors import ConfigError, NotFittedError, SlideError, WSIQCError

_LAZY = {"fit_reference": "wsi_qc.api", "fit_threshold": "wsi_qc.api", "qc_folder": "wsi_qc.api",
         "load_config": "wsi_qc.config", "Scorer": "wsi_qc.scorer", "Slide": "wsi_qc.slide"}

__all__ = ["ConfigError", "NotFittedError", "SlideError", "WSIQCError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wsi_qc' has no attribute {name!r}")
