"""Learning "normal" from a cohort: the unlabelled, mostly good slides a lab wants QC'd.

- `robust`: a scorer fitted on inputs that may hold artifacts (trimmed refitting), and the inlier core of its
  calibration tiles that sets a label-free cut;
- `folder`: `wsi-qc run slides/` without a scorer: tiles drawn across the folder, the cohort scorer and its cut
  fitted once and kept beside the store.
"""
