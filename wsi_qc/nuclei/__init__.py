"""Nuclei from frozen encoders (Vadori et al., "Mind the Gap"): data readers, a decoder over multi-level
encoder maps (foreground, distance, type), watershed post-processing, HoVer-Net metrics, training.

    from wsi_qc.nuclei import NucleiModel, read_folder
    model = NucleiModel.load("model/", mpp=0.25)
    [(instances, table)] = model.predict(images)   # uint8 (B, H, W, 3) -> uint16 map + one row per nucleus
"""

from wsi_qc.nuclei.data import Sample, read_folder
from wsi_qc.nuclei.model import NucleiModel

__all__ = ["NucleiModel", "Sample", "read_folder"]
