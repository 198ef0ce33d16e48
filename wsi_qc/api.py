"""The Python API: fit a reference, fit its threshold, QC a folder (the `wsi-qc` commands call the same functions).

    import wsi_qc
    wsi_qc.fit_reference(["good/"]).save("scorer")                  # known-good slides or folders of tiles
    tiles = wsi_qc.Scorer.load("scorer").score_slide("slide.tif")   # one row per tile: x, y, rl2, nll
    wsi_qc.fit_threshold("scorer", false_discard=0.02, out="calibration.json")
    rows = wsi_qc.qc_folder(["slides/"], "scorer", "calibration.json", out="qc.zarr")
    rows = wsi_qc.qc_folder(["slides/"], out="qc.zarr")   # no scorer: the slides' own cohort scorer and cut
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from wsi_qc.config import explicit_keys, load_config
from wsi_qc.errors import ConfigError

ConfigLike = str | Path | dict | None


def as_config(config: ConfigLike = None) -> dict:
    """A full config from None (the defaults), a YAML file or a dict of overrides."""
    if config is None:
        return load_config()
    if explicit_keys(config) is not None:  # already a loaded config: a copy that keeps which keys were set
        return copy.deepcopy(config)
    if isinstance(config, dict):
        return load_config(overrides=config)
    return load_config(config)


def _paths(inputs) -> list:
    return [inputs] if isinstance(inputs, (str, Path)) else list(inputs)


def fit_reference(inputs: str | Path | Iterable[str | Path], config: ConfigLike = None):
    """A Scorer fitted on known-good slides (files) and/or folders of tile images; save it with .save(path).
    With reference.robust (a cohort: inputs that may hold artifacts), fitted by wsi_qc.cohort.robust.fit_robust.
    With cascade.enabled, the cascade's coarse pass is fitted on the same tiles."""
    from wsi_qc.cascade import coarse_config
    from wsi_qc.cohort.robust import fit_robust
    from wsi_qc.scorer import Scorer, encoder_from_config, reference_features

    config = as_config(config)
    robust = config["reference"]["robust"]
    if robust and config["cascade"]["enabled"]:
        raise ConfigError("the cascade is not fitted on cohorts (reference.robust); set cascade.enabled: false or fit "
                          "a curated reference")
    encoder = encoder_from_config(config)
    features, groups = reference_features(_paths(inputs), encoder, config)
    scorer = (fit_robust if robust else Scorer.fit)(features, encoder, config, groups=groups)
    if config["cascade"]["enabled"]:
        coarse = encoder_from_config(coarse_config(config))
        scorer.fit_cascade(reference_features(_paths(inputs), coarse, config)[0], coarse, groups=groups)
    return scorer


def fit_threshold(scorer: str | Path, labels: str | Path | None = None, *, good=None, bad=None,
                  false_discard: float | None = None, out: str | Path = "calibration.json",
                  config: ConfigLike = None, roc: str | Path | None = None, verbose: bool = False) -> dict:
    """Fit the threshold of a saved scorer: on labelled tiles (labels CSV, or good/bad folders), or without
    labels at a false-discard rate of its calibration tiles (a cohort scorer without labels or a rate: at
    reference.false_discard); writes `out` and returns a summary."""
    from wsi_qc.calibrate import calibrate as fit

    config = as_config(config)
    if false_discard is not None:
        config["threshold"].update(rule="false_discard", value=false_discard)
    return fit(config, scorer, labels=labels, good=good, bad=bad, out=out, roc=roc, verbose=verbose)


def report_folder(out: str | Path, report: str | Path | None = None) -> Path:
    """The report folder of a store: `report`, or <store name>-report beside it."""
    out = Path(out)
    return Path(report or out.with_name(out.name.removesuffix(".zarr") + "-report"))


def qc_folder(inputs: str | Path | Iterable[str | Path], scorer: str | Path | None = None,
              calibration: str | Path | None = None, out: str | Path = "qc.zarr", config: ConfigLike = None,
              report: str | Path | None = None, force: bool = False, embed: bool = False,
              reference: Iterable[str | Path] = ()) -> list[dict]:
    """QC slides (files, folders, CSV manifests) into the zarr store `out` and its report; one row per slide.

    Without `scorer` (and `calibration`), the slides' own cohort scorer and label-free cut are fitted first (or
    reused), beside the store (wsi_qc.cohort.folder), with the curated `reference` inputs as trusted tissue."""
    from wsi_qc.cohort.folder import cohort_scorer
    from wsi_qc.run import collect_slides, run_slides
    from wsi_qc.report import write_run_report
    from wsi_qc.store import locked

    if (scorer is None) != (calibration is None):
        raise ConfigError("pass both a scorer and its calibration (--scorer, --calibration), or neither to fit the "
                          "slides' own cohort scorer and label-free cut")
    if scorer is not None and reference:
        raise ConfigError("curated reference inputs (--reference) are for a cohort run; with --scorer, refit the "
                          "scorer on them instead (wsi-qc fit-reference)")
    config = as_config(config)
    out, report_dir = Path(out), report_folder(out, report)
    inputs = [str(p) for p in _paths(inputs)]
    paths = collect_slides(inputs, config["run"]["pattern"])
    if not paths:
        raise ConfigError(f"no slides found in {', '.join(inputs)} (pattern {config['run']['pattern']}); "
                          f"pass slide files, a folder or a CSV manifest")
    with locked(out, wait=config["run"]["lock_wait"]):  # one run per store, its report included
        if scorer is None:
            scorer, calibration = cohort_scorer(paths, config, out, [str(p) for p in _paths(reference)])
        rows = run_slides(paths, scorer, calibration, config, out, report_dir, force=force)
        write_run_report(rows, out, report_dir, embed=embed)
    return rows
