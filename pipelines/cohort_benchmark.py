"""The cohort benchmark: QC of real tissue of many organs, stains and labs, with no curated reference and no labels.

Tiles come from the real images of ../shared/data (MoNuSeg: seven organs at 40x; CPM-15: glioblastoma and head and
neck; GBM and LGG brain tiles; one kidney in eleven stains, each image halved into two units; the CMU-1 skin slide;
the real clean/inked pen pairs). Source units are split per organ/stain group into the cohort (what the scorer is
fitted on, unlabelled), selection (chooses reference.stat_z and core_z) and test (reported); never by tile.
Cohort tiles are replaced by an artifact version at a prevalence (0-30 %); selection and test units get artifact tiles of every kind
and severity (synthetic, wsi_qc.artifacts, on this real tissue) and the real inked pen tiles.

References compared, each through the shipped procedure (`Scorer.fit` or `cohort.fit_robust`, then
`Threshold.fit_label_free` on the scorer's calibration tiles): curated-narrow (CMU-1 and two TUPAC breast tiles),
curated-broad (the cohort's clean tiles), cohort-naive (the contaminated cohort, plain fit) and cohort-robust
(trimmed refitting, cut on the inlier core); beside them a Ledoit-Wolf Gaussian and kNN on the same features and
fitting tiles, and the best single image statistic (chosen on selection). Reported on test: AUROC overall and per
kind, and at the label-free cut the recall per kind and the false discards per organ and per stain, with 95 %
bootstrap CIs that resample source units.

    python -m pipelines.cohort_benchmark --out out/cohort_benchmark [--config configs/cohort_benchmark.yaml]
"""

from __future__ import annotations

import csv
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from pipelines.qc_benchmark import (KNN, PEN, PEN_MPP, SHARED, Gaussian, _pen_mosaics, _resample, _slide_tiles,
                                    auroc, bench_main, features_of, local_maps)
from wsi_qc.artifacts import make_artifact
from wsi_qc.cohort.robust import fit_robust
from wsi_qc.encoder import stats_names
from wsi_qc.scorer import Scorer, aggregate, encoder_from_config
from wsi_qc.threshold import Threshold

log = logging.getLogger("pipelines.cohort_benchmark")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "cohort_benchmark.yaml"
SPLITS = ("cohort", "selection", "test")
TISSUE_SPREAD = 20  # a pixel is tissue when its RGB channels spread by more than this (grey glass does not)


def tiles_of(image: np.ndarray, size: int, cap: int, rng) -> list[np.ndarray]:
    """Overlapping size x size tiles of an image (about 1.5 per tile length along each side), at most `cap`
    (seeded draw), each at least half tissue."""
    h, w = image.shape[:2]
    if min(h, w) < size:
        return []
    ys, xs = (np.linspace(0, n - size, max(1, int(np.ceil(1.5 * n / size)) - 1)).round().astype(int) for n in (h, w))
    tiles = [image[y:y + size, x:x + size] for y in ys for x in xs]
    tiles = [t for t in tiles if np.mean(np.ptp(t.astype(np.int16), axis=2) > TISSUE_SPREAD) >= 0.5]
    return [tiles[i] for i in sorted(rng.permutation(len(tiles))[:cap])]


def _image(path: Path, mpp: float, target: float) -> np.ndarray:
    return _resample(np.asarray(Image.open(path).convert("RGB")), mpp, target)


def collect_units(config: dict, own: dict) -> list[dict]:
    """Source units: {name, organ, stain, split ("" = chosen later, "narrow", "test"), tiles}; absent folders are
    skipped with a warning."""
    size, mpp, cap = config["tiles"]["size"], config["tiles"]["mpp"], own["tiles_per_unit"]
    rng = np.random.default_rng(own["seed"])
    units = []

    def add(name, organ, stain, tiles, split=""):
        if tiles:
            units.append({"name": name, "organ": organ, "stain": stain, "tiles": tiles, "split": split})

    nuclei, tissue = SHARED / "nuclei", SHARED / "tissue"
    for folder, column in ((nuclei / "monuseg_train", "organ"), (nuclei / "cpm15", "tissue")):
        if not (folder / "images.csv").is_file():
            log.warning("%s is absent; skipped", folder)
            continue
        for row in csv.DictReader((folder / "images.csv").open()):
            path = next((folder / "images").glob(row["image"] + ".*"))
            organ = (re.sub(r" \(.*", "", row[column]) if folder.name.startswith("monuseg")
                     else "brain/head-neck (CPM-15)")
            add(row["image"], organ, "H&E", tiles_of(_image(path, float(row.get("mpp") or row["mpp_approx"]), mpp),
                                                     size, cap, rng))
    for path in sorted((tissue / "kidney_stains").glob("*.jpg")):
        image = _image(path, 0.5, mpp)  # ~0.5 mpp (inferred by the source, not stated)
        half = image.shape[0] // 2
        for part, region in (("top", image[:half]), ("bottom", image[half:])):
            add(f"{path.stem}-{part}", "kidney", path.stem.replace("kidney_stain_", "kidney stain "),
                tiles_of(region, size, cap, rng))
    for path in sorted((tissue / "brain_gbm").glob("*.jpg")):  # mpp not stated: taken as 0.5
        add(path.stem, "brain GBM", "H&E", tiles_of(_image(path, 0.5, mpp), size, cap, rng))
    lgg: dict[str, list] = {}
    for path in sorted((tissue / "brain_lgg").glob("*.jpg")):  # mpp not stated: taken as 0.5
        lgg.setdefault(path.stem.split("_")[0], []).extend(tiles_of(_image(path, 0.5, mpp), size, cap, rng))
    for name, tiles in lgg.items():
        add(name, "brain LGG", "H&E", tiles[:cap])
    cmu1 = SHARED / "slides" / "CMU-1-Small-Region.svs"
    if cmu1.is_file():
        images = _slide_tiles(cmu1, None, config, {"max_tiles": own["cmu1_tiles"]}, rng)[0]
        add("cmu1", "skin", "H&E", images, split="cohort")
    for name in ("TUPAC-TR-002-tile-r34-c34-x33793-y33799-w1024-h1024",
                 "TUPAC-TR-002-tile-r35-c37-x36865-y34823-w1024-h1024"):
        path = SHARED / "artifacts" / "python_wsi_preprocessing" / f"{name}.png"
        if path.is_file():
            tiles = tiles_of(_image(path, 0.25 * 1024 / 600, mpp), size, cap, rng)
            add(f"tupac-{name[18:21]}", "breast (TUPAC)", "H&E", tiles, split="narrow")
    if (SHARED / PEN).is_dir():
        mosaics = {k: tiles_of(_resample(v, PEN_MPP, mpp), size, 10 ** 6, np.random.default_rng(0))
                   for k, v in _pen_mosaics().items()}
        add("pen-skin", "skin (pen pairs)", "H&E", list(zip(mosaics["clean"], mosaics["inked"])), split="test")
    if not units:
        raise SystemExit(f"no tissue found under {SHARED}; the cohort benchmark needs ../shared/data")
    return units


def assign_splits(units: list[dict], own: dict) -> None:
    """Split each organ/stain group's units (seeded): cohort, selection, test shares of own["split"]."""
    rng = np.random.default_rng(own["seed"])
    groups: dict[tuple, list] = {}
    for u in units:
        if not u["split"]:
            groups.setdefault((u["organ"], u["stain"]), []).append(u)
    for turn, (_, members) in enumerate(sorted(groups.items())):
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        if n == 1:
            names = ["cohort"]
        elif n == 2:
            names = ["cohort", ("selection", "test")[turn % 2]]
        else:
            n_cohort = max(1, int(round(own["split"]["cohort"] * n)))
            n_sel = max(1, int(round(own["split"]["selection"] * n)))
            n_cohort = min(n_cohort, n - n_sel - 1)
            names = ["cohort"] * n_cohort + ["selection"] * n_sel + ["test"] * (n - n_cohort - n_sel)
        for u, split in zip(members, names):
            u["split"] = split


def build_table(units: list[dict], own: dict) -> tuple[list, dict]:
    """(images, columns) of every tile: cohort tiles clean and their artifact version (`twin`: the row of the
    other version, `u`: the draw that sets at which prevalence the artifact version replaces the clean one),
    narrow tiles, selection/test tiles clean or as artifacts of every severity."""
    rng = np.random.default_rng([own["seed"], 1])
    images, cols = [], {k: [] for k in ("unit", "organ", "stain", "split", "label", "kind", "severity", "source",
                                        "twin", "u")}
    kinds, turn = own["kinds"], 0

    def add(image, u, label, kind="", severity=0, source="", twin=-1, draw=1.0):
        images.append(image)
        for k, v in zip(cols, (u["name"], u["organ"], u["stain"], u["split"], label, kind, severity, source, twin,
                               draw)):
            cols[k].append(v)
        return len(images) - 1

    for u in units:
        for i, tile in enumerate(u["tiles"]):
            source = f"{u['name']}:{i}"
            if u["name"] == "pen-skin":
                add(tile[0], u, 0, source=source)
                add(tile[1], u, 1, "real_pen", 2, source)
                continue
            kind = kinds[turn % len(kinds)]
            if u["split"] == "cohort":
                turn += 1
                draw = float(rng.uniform())
                clean = add(tile, u, 0, source=source, draw=draw)
                art = make_artifact(tile, kind, int(rng.integers(1, 4)), np.random.default_rng([own["seed"], turn]))
                cols["twin"][clean] = add(art, {**u, "split": "cohort_artifact"}, 1, kind, 0, source, clean, draw)
            elif u["split"] in ("selection", "test") and rng.uniform() < own["artifact_fraction"]:
                turn += 1
                for severity in own["severities"]:
                    art = make_artifact(tile, kind, severity, np.random.default_rng([own["seed"], turn, severity]))
                    add(art, u, 1, kind, severity, source)
            else:
                add(tile, u, 0, source=source)
    return images, {k: np.asarray(v) for k, v in cols.items()}


def fit_rows(t: dict, variant: str, prevalence: float) -> np.ndarray:
    """Rows a reference variant is fitted on: narrow (CMU-1 + TUPAC), broad (clean cohort), cohort (clean cohort
    tiles, each replaced by its artifact version when its draw is below the prevalence)."""
    if variant == "narrow":
        return np.flatnonzero((t["split"] == "narrow") | ((t["unit"] == "cmu1") & (t["split"] == "cohort")))
    clean = np.flatnonzero(t["split"] == "cohort")
    if variant == "broad":
        return clean
    return np.where(t["u"][clean] < prevalence, t["twin"][clean], clean)


def unit_weights(units: np.ndarray, n: int, seed: int):
    names, inverse = np.unique(units, return_inverse=True)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))[inverse]


def _rate(hit: np.ndarray, weights=None) -> float:
    if not len(hit):
        return float("nan")
    w = np.ones(len(hit)) if weights is None else weights
    return float(np.sum(w * hit) / np.sum(w)) if np.sum(w) else float("nan")


def ci(stat, units: np.ndarray, own: dict) -> list[float]:
    """95 % percentile CI of stat(weights) over bootstrap resamples of source units."""
    values = [v for w in unit_weights(units, own["n_bootstrap"], own["seed"]) if np.isfinite(v := stat(w))]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else [float("nan")] * 2


def evaluate(scores: np.ndarray, cut: float, t: dict, split: str, own: dict) -> dict:
    """AUROC overall and per kind, false discards overall/per organ/per stain, recall per kind (severity >= 2)."""
    m = t["split"] == split
    y, kind, sev, units, s = t["label"][m], t["kind"][m], t["severity"][m], t["unit"][m], scores[m]
    good, out = y == 0, s > cut
    strong = (y == 1) & (sev >= 2)

    def safe_auroc(mask, w=None):
        return auroc(s[mask], y[mask], None if w is None else w[mask]) if len(np.unique(y[mask])) == 2 else np.nan

    res = {"auroc": auroc(s, y), "auroc_ci": ci(lambda w: safe_auroc(np.ones(len(y), bool), w), units, own),
           "false_discard": _rate(out[good]), "false_discard_ci": ci(lambda w: _rate(out[good], w[good]), units, own),
           "recall": _rate(out[strong]), "recall_ci": ci(lambda w: _rate(out[strong], w[strong]), units, own),
           "kinds": {}, "organs": {}, "stains": {}, "n_clean": int(good.sum()), "n_bad": int((~good).sum())}
    for k in sorted(set(kind[~good])):
        km = good | (kind == k)
        res["kinds"][k] = {"auroc": safe_auroc(km), "recall": _rate(out[(kind == k) & (sev >= 2)]),
                           "recall_mild": _rate(out[(kind == k) & (sev == 1)])}
    for key, column in (("organs", "organ"), ("stains", "stain")):
        values = t[column][m]
        for g in sorted(set(values[good])):
            gm = good & (values == g)
            res[key][g] = {"false_discard": _rate(out[gm]), "n": int(gm.sum())}
    return res


def paired(a: tuple, b: tuple, t: dict, own: dict) -> dict:
    """Recall and false discards of a minus b (each (scores, cut)) on the test split, 95 % CI from the same unit
    resamples."""
    m = t["split"] == "test"
    y, sev, units = t["label"][m], t["severity"][m], t["unit"][m]
    good, strong = y == 0, (y == 1) & (sev >= 2)
    oa, ob = a[0][m] > a[1], b[0][m] > b[1]
    out = {}
    for name, mask in (("recall", strong), ("false_discard", good)):
        def diff(w, mask=mask):
            return _rate(oa[mask], w[mask]) - _rate(ob[mask], w[mask])
        out[name] = [diff(np.ones(len(y)))] + ci(diff, units, own)
    return out


def label_free_cut(calibration_scores: np.ndarray, own: dict, trimmed: int = 0) -> float:
    return Threshold("false_discard", own["false_discard"]).fit_label_free(calibration_scores, trimmed).threshold_


def baselines(scorer: Scorer, feats: np.ndarray, rows: np.ndarray, own: dict, config: dict) -> dict:
    """Ledoit-Wolf Gaussian and kNN per position on the tiles the flow was fitted on, aggregated like the flow; cut
    on the flow's calibration tiles (its inlier core for a robust fit)."""
    out = {}
    fitted, calib = rows[scorer.fitted_], rows[scorer.calibration_]
    core = np.ones(len(calib), bool) if scorer.inlier_ is None else scorer.inlier_
    for name, head in (("gaussian", Gaussian()), ("knn", KNN(own["knn_coreset"], own["seed"]))):
        mask = np.zeros(len(feats), bool)
        mask[fitted] = True
        scores = aggregate(local_maps(head, feats, mask), config["score"]["aggregate"])
        out[name] = (scores, label_free_cut(scores[calib][core], own, int((~core).sum())))
    return out


def best_statistic(feats: np.ndarray, t: dict, config: dict) -> tuple[str, np.ndarray]:
    """The per-tile image statistic (either sign) with the best selection AUROC, as a score of every tile."""
    names = stats_names(True, config["encoder"]["grid"])
    columns = feats[:, 0, 0, feats.shape[-1] - len(names):]
    sel = t["split"] == "selection"
    best = max(((auroc(sign * columns[sel, j], t["label"][sel]), name, sign, j)
                for j, name in enumerate(names) if name.startswith("tile_") for sign in (1, -1)), key=lambda r: r[0])
    return f"{'' if best[2] > 0 else 'minus '}{best[1][5:]}", best[2] * columns[:, best[3]]


def run_benchmark(config: dict, own: dict, out: Path) -> dict:
    start = time.perf_counter()
    units = collect_units(config, own)
    assign_splits(units, own)
    images, t = build_table(units, own)
    counts = {s: {"units": len({u["name"] for u in units if u["split"] == s}),
                  "clean": int(((t["split"] == s) & (t["label"] == 0)).sum()),
                  "bad": int(((t["split"] == s) & (t["label"] == 1)).sum())} for s in (*SPLITS, "narrow")}
    log.info("tiles: %s", counts)
    feats = features_of(SimpleNamespace(images=images), config, {}, out)  # cached by the tiles' bytes
    encoder = encoder_from_config(config)
    results = {"counts": counts, "units": {u["name"]: [u["organ"], u["stain"], u["split"]] for u in units},
               "variants": {}, "selection_trim_z": {}}
    kept = {}

    def record(name, scorer_or_scores, cut, seconds, extra=None):
        scores = scorer_or_scores if isinstance(scorer_or_scores, np.ndarray) else scorer_or_scores.score(feats)
        kept[name] = (scores, cut)
        results["variants"][name] = {"threshold": cut, "seconds": round(seconds, 1), **(extra or {}),
                                     "selection": evaluate(scores, cut, t, "selection", own),
                                     "test": evaluate(scores, cut, t, "test", own)}
        r = results["variants"][name]["test"]
        log.info("%s: test AUROC %.3f, false discards %.3f, recall %.3f (%.0f s)", name, r["auroc"],
                 r["false_discard"], r["recall"], seconds)
        return scores

    def fit(variant, prevalence, reference=None):
        rows = fit_rows(t, variant, prevalence)
        cfg = {**config, "reference": {**config["reference"], **(reference or {})}}
        t0 = time.perf_counter()
        if reference is None:
            scorer = Scorer.fit(feats[rows], encoder, cfg, groups=t["unit"][rows])
        else:
            scorer = fit_robust(feats[rows], encoder, cfg, groups=t["unit"][rows])
        cut = label_free_cut(scorer.heldout_scores(), own, scorer.trimmed)
        return scorer, rows, cut, time.perf_counter() - t0, cfg

    for variant in ("narrow", "broad"):
        scorer, rows, cut, sec, _ = fit(variant, 0.0)
        record(f"curated-{variant}", scorer, cut, sec)
    for p in own["naive_prevalence"]:
        scorer, rows, cut, sec, cfg = fit("cohort", p)
        record(f"cohort-naive {p:.0%}", scorer, cut, sec)
        if p == own["baselines_at"]:
            for name, (scores, bcut) in baselines(scorer, feats, rows, own, cfg).items():
                record(f"cohort-naive {p:.0%} {name}", scores, bcut, 0.0)
    # stat_z and core_z chosen on selection at the baselines' prevalence: the best recall among the settings whose
    # false discards stay within the goal (5 %), else the fewest false discards
    p_sel = own["baselines_at"]
    fits, chosen = {}, {}
    for stat_z in own["stat_z"]:
        fits[stat_z] = fit("cohort", p_sel, {"stat_z": stat_z})
        scorer = fits[stat_z][0]
        scores = scorer.score(feats)
        for core_z in own["core_z"]:
            cut = label_free_cut(scorer.set_core(core_z).heldout_scores(), own, scorer.trimmed)
            sel = evaluate(scores, cut, t, "selection", own)
            chosen[(stat_z, core_z)] = {k: sel[k] for k in ("auroc", "false_discard", "recall")}
    ok = [k for k, v in chosen.items() if v["false_discard"] <= own["selection_false_discard"]]
    stat_z, core_z = (max(ok, key=lambda k: chosen[k]["recall"]) if ok
                      else min(chosen, key=lambda k: chosen[k]["false_discard"]))
    results["selection_settings"] = {f"stat_z {a}, core_z {b}": v for (a, b), v in chosen.items()}
    results["chosen"] = {"stat_z": stat_z, "core_z": core_z}
    setting = {"stat_z": stat_z, "core_z": core_z}
    for p in own["prevalence"]:
        if p == p_sel:
            scorer, rows, _, sec, cfg = fits[stat_z]
            cut = label_free_cut(scorer.set_core(core_z).heldout_scores(), own, scorer.trimmed)
        else:
            scorer, rows, cut, sec, cfg = fit("cohort", p, setting)
        fitting = ~scorer.calibration_
        record(f"cohort-robust {p:.0%}", scorer, cut, sec, {
            "trimmed_share": float(1 - scorer.fitted_.sum() / max(1, fitting.sum())),
            "trimmed_artifacts": int(t["label"][rows[~scorer.fitted_ & fitting]].sum()),
            "cohort_artifacts": int(t["label"][rows[fitting]].sum()),
            "calibration_trimmed": scorer.trimmed, "calibration_core": int(len(scorer.heldout_scores()))})
        if p == p_sel:
            for name, (scores, bcut) in baselines(scorer, feats, rows, own, cfg).items():
                record(f"cohort-robust {p:.0%} {name}", scores, bcut, 0.0)
    name, scores = best_statistic(feats, t, config)
    sel_cut = float(np.quantile(scores[(t["split"] == "cohort") & (t["label"] == 0)], 1 - own["false_discard"]))
    record(f"best statistic: {name}", scores, sel_cut, 0.0)
    robust, naive = f"cohort-robust {p_sel:.0%}", f"cohort-naive {p_sel:.0%}"
    if naive in kept:
        results["robust_minus_naive"] = paired(kept[robust], kept[naive], t, own)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def _cell(value, interval=None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def markdown(results: dict) -> str:
    """Result tables of the test split."""
    rows = results["variants"]
    kinds = sorted({k for r in rows.values() for k in r["test"]["kinds"]})
    lines = ["Test split, AUROC per kind (clean vs that kind, all severities):", "",
             "| reference | AUROC [95 % CI] | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name, r in rows.items():
        t = r["test"]
        lines.append(f"| {name} | {_cell(t['auroc'], t['auroc_ci'])} | "
                     + " | ".join(_cell(t["kinds"].get(k, {}).get("auroc")) for k in kinds) + " |")
    lines += ["", "Test split at the label-free 2 % cut: false discards of clean tiles, recall of moderate and strong "
              "(severity >= 2) artifacts, worst organ and stain group:", "",
              "| reference | cut | false discards [95 % CI] | recall [95 % CI] | worst organ | worst stain |",
              "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t = r["test"]
        worst = {key: max(t[key].items(), key=lambda kv: (kv[1]["false_discard"], kv[1]["n"]), default=None)
                 for key in ("organs", "stains")}
        cells = [f"{g} {v['false_discard']:.2f} (n={v['n']})" if (gv := worst[key]) and (g := gv[0]) and (v := gv[1])
                 else "-" for key in ("organs", "stains")]
        lines.append(f"| {name} | {r['threshold']:.3f} | {_cell(t['false_discard'], t['false_discard_ci'])} | "
                     f"{_cell(t['recall'], t['recall_ci'])} | {cells[0]} | {cells[1]} |")
    focus = [n for n in rows if n.startswith(("curated", "cohort-naive 15", "cohort-robust 15"))
             and not n.endswith(("gaussian", "knn"))]
    for key in ("organs", "stains"):
        groups = sorted({g for n in focus for g in rows[n]["test"][key]})
        lines += ["", f"Test false discards per {key[:-1]} (clean tiles, label-free cut):", "",
                  f"| {key[:-1]} | n | " + " | ".join(focus) + " |", "|---|---|" + "---|" * len(focus)]
        for g in groups:
            n = rows[focus[0]]["test"][key].get(g, {}).get("n", 0)
            lines.append(f"| {g} | {n} | " + " | ".join(_cell(rows[f]["test"][key].get(g, {}).get("false_discard"))
                                                      for f in focus) + " |")
    lines += ["", "Test recall per kind at the cut (severity >= 2; severity 1 in brackets):", "",
              "| kind | " + " | ".join(focus) + " |", "|---|" + "---|" * len(focus)]
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(
            f"{_cell(rows[f]['test']['kinds'].get(k, {}).get('recall'))} "
            f"({_cell(rows[f]['test']['kinds'].get(k, {}).get('recall_mild'))})" for f in focus) + " |")
    lines += ["", f"chosen on selection (15 % prevalence): {results['chosen']}; selection: " + "; ".join(
        f"{k}: AUROC {v['auroc']:.3f}, false discards {v['false_discard']:.3f}, recall {v['recall']:.3f}"
        for k, v in results["selection_settings"].items())]
    for name, r in rows.items():
        if "trimmed_share" in r:
            lines.append(f"{name}: trimmed {100 * r['trimmed_share']:.1f} % of the fitting tiles "
                         f"({r['trimmed_artifacts']} of its {r['cohort_artifacts']} artifact tiles); calibration core "
                         f"{r['calibration_core']} tiles, {r['calibration_trimmed']} left out; fit {r['seconds']} s")
    if "robust_minus_naive" in results:
        d = results["robust_minus_naive"]
        lines.append("cohort-robust minus cohort-naive at 15 %, test, paired unit bootstrap: " + "; ".join(
            f"{k} {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for k, v in d.items()))
    c = results["counts"]
    lines.append("tiles (units, clean/bad): " + ", ".join(f"{s} {v['units']} units {v['clean']}/{v['bad']}"
                                                          for s, v in c.items()))
    lines.append(f"total {results['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, __doc__, DEFAULT_CONFIG, "out/cohort_benchmark", run_benchmark, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
