"""The flow: a FrEIA normalizing flow fitted on reference features, with its input standardisation and PCA.

A feature vector x (D,) goes through three fitted maps to a latent z (D',):

1. standardise: ``s = (x - mean_) / scale_`` (per-feature reference mean and std; the std is floored at
   1 % of the median std so that a feature that barely varies in the reference cannot dominate the score);
2. PCA (optional): ``u = (s @ pca_.T) / pca_std_``, the first D' principal axes of the standardised
   reference, whitened; without PCA ``u = s``;
3. the invertible network ``z = inn_(u)``: a SequenceINN of ``n_blocks`` FrEIA AllInOneBlocks (affine
   coupling with clamping, soft permutation by a fixed random rotation, global affine "ActNorm"), each
   coupling subnet a Linear-ReLU-Linear MLP of width ``hidden`` whose last layer starts at zero, so the
   untrained flow is the identity (up to the rotations) and training starts at a whitened Gaussian.

Fitting maximises the likelihood of the reference under a standard Gaussian latent,
``loss = (0.5 ||z||^2 - log|det J|) / D'`` per tile, with Adam, on a seeded training part of the
reference; the rest (``val_fraction``) picks the best epoch and stops training after ``patience`` epochs
without improvement. The standardisation, PCA and ``mu_`` (the mean latent of the training part) are
computed on the training part only, so the validation loss is an honest held-out number.

PCA rule (``pca_dim``): ``None`` picks ``min(D, N_train // 2)`` components (N_train = training vectors), so a
pooled flow on a few hundred tiles of 512-2048-d features is PCA-reduced (else it learns the tiles, not the
tissue) and a local flow (196 vectors per tile) is not; an int keeps that many (at most ``N_train - 1``).

``nll`` is the negative log-likelihood per latent dimension of the flow input u,
``0.5 ||z||^2 / D' + 0.5 log(2 pi) - log|det J| / D'``; the affine standardisation/PCA step adds the same
constant to every tile and is left out.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from wsi_qc import __version__
from wsi_qc.config import resolve_device
from wsi_qc.cpu_runtime import import_runtime, openvino_model, openvino_settings
from wsi_qc.errors import ConfigError, NotFittedError
from wsi_qc.identity import Digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when flow.safetensors / meta.json change incompatibly
WEIGHTS_FILE = "flow.safetensors"
META_FILE = "meta.json"
SCALE_FLOOR = 0.01  # feature std floor, as a fraction of the median feature std
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
CPU_RUNTIMES = ("torch", "openvino")  # what runs a fitted flow's scoring on the CPU
# rows per call of the flow in OpenVINO: a static shape, padded (a dynamic batch raised the 60k x 45k benchmark
# slide's peak memory by 450 MiB; 2048 rows ran as fast as larger chunks)
OPENVINO_ROWS = 2048
PARAMS = ("pca_dim", "n_blocks", "hidden", "clamp", "epochs", "batch_size", "lr", "weight_decay",
          "val_fraction", "patience", "seed", "min_reference")


def _subnet(hidden: int):
    def make(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net
    return make


class _Block(Fm.AllInOneBlock):
    """FrEIA's AllInOneBlock, its affine coupling on contiguous halves of the subnet's output: the same numbers
    (bitwise), a third less time on CPU, where tanh over a strided half is slow."""

    def _affine(self, x, a, rev=False):
        s, t = (half.contiguous() for half in (a * 0.1).split(x.shape[1], dim=1))
        sub_jac = self.clamp * torch.tanh(s)
        if not rev:
            return x * torch.exp(sub_jac) + t, torch.sum(sub_jac, dim=self.sum_dims)
        return (x - t) * torch.exp(-sub_jac), -torch.sum(sub_jac, dim=self.sum_dims)


class _Scoring(nn.Module):
    """A fitted SequenceINN of _Blocks as one plain module for scoring: u (B, D) -> (B, D + 1), the latent z and
    log|det J| as the last column. Each block's global scale and offset are folded into its rotation, so neither
    FrEIA's code nor its Softplus reaches the graph that OpenVINO converts."""

    def __init__(self, inn: Ff.SequenceINN) -> None:
        super().__init__()
        blocks = list(inn.module_list)
        self.splits, self.clamp = blocks[0].splits, float(blocks[0].clamp)
        self.subnets = nn.ModuleList(block.subnet for block in blocks)
        weights, biases, log_scale = [], [], 0.0
        with torch.no_grad():
            for block in blocks:  # rotation W of (x * scale + offset) = x (W scale)^T + W offset
                scale = block.global_scale_activation(block.global_scale).reshape(-1)
                w = block.w_perm.reshape(len(scale), len(scale))
                weights.append(w * scale)
                biases.append(w @ block.global_offset.reshape(-1))
                log_scale += float(torch.log(scale).sum())
        self.register_buffer("weights", torch.stack(weights))
        self.register_buffer("biases", torch.stack(biases))
        self.log_scale = log_scale

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x, log_jac = u, torch.zeros_like(u[:, 0])
        for subnet, w, bias in zip(self.subnets, self.weights, self.biases):
            x1, x2 = x.split(self.splits, dim=1)
            s, t = (subnet(x1) * 0.1).split(x2.shape[1], dim=1)
            sub_jac = self.clamp * torch.tanh(s)
            x = F.linear(torch.cat([x1, x2 * torch.exp(sub_jac) + t], dim=1), w, bias)
            log_jac = log_jac + sub_jac.sum(1)
        return torch.cat([x, (log_jac + self.log_scale)[:, None]], dim=1)


def _build_inn(dim: int, n_blocks: int, hidden: int, clamp: float,
               rng: np.random.Generator | None) -> Ff.SequenceINN:
    """SequenceINN of AllInOneBlocks with soft permutations (random rotations) drawn from `rng`; FrEIA's own
    draw uses the global numpy state and is slow above 512 dims. rng=None leaves them to load_state_dict."""
    inn = Ff.SequenceINN(dim)
    np_state = np.random.get_state()  # hard permutations drawn by FrEIA are overwritten below
    try:
        for _ in range(n_blocks):
            inn.append(_Block, subnet_constructor=_subnet(hidden), affine_clamping=clamp,
                       permute_soft=False)
    finally:
        np.random.set_state(np_state)
    if rng is None:
        return inn
    with torch.no_grad():
        for block in inn.module_list:
            q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
            q = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
            w = torch.as_tensor(q, dtype=torch.float32)
            block.w_perm.copy_(w.view(dim, dim))
            block.w_perm_inv.copy_(w.T.contiguous().view(dim, dim))
    return inn


def held_out(groups: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which rows are held out of fitting: round(fraction x number of groups) whole groups drawn with `rng`, at
    least one group kept."""
    names = np.unique(groups)
    held = rng.permutation(names)[:min(int(round(len(names) * fraction)), len(names) - 1)]
    return np.isin(groups, held)


def _check_finite(features: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise ConfigError(f"{int(bad.sum())} of {len(features)} {what} rows hold NaN or inf features; "
                          f"drop those rows (features[np.isfinite(features).all(1)]) or fix their tiles")


def _fingerprint(weights: Path, meta: dict) -> str:
    """A scorer's fingerprint. Key: the bytes of the weights file, then the meta (without its fingerprint) as JSON
    with sorted keys (identity.Digest): any change to either shows."""
    return Digest().file(weights).json({k: v for k, v in meta.items() if k != "fingerprint"}).hex()


class Flow:
    """Normalizing flow fitted on reference features; see the module docstring for the definitions."""

    def __init__(self, pca_dim: int | None = None, n_blocks: int = 6, hidden: int = 128, clamp: float = 2.0,
                 epochs: int = 40, batch_size: int = 2048, lr: float = 1e-3, weight_decay: float = 1e-5,
                 val_fraction: float = 0.2, patience: int = 5, seed: int = 0, min_reference: int = 50,
                 device: str = "cpu", cpu_runtime: str = "torch"):
        # the hyper-parameters' defaults are configs/default.yaml's flow section (tests/test_scorer.py holds them
        # equal); device and cpu_runtime default to plain torch on the CPU, the config's to auto and openvino
        self.pca_dim = pca_dim
        self.n_blocks = n_blocks
        self.hidden = hidden
        self.clamp = clamp
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_fraction = val_fraction
        self.patience = patience
        self.seed = seed
        self.min_reference = min_reference
        self.device = device
        if cpu_runtime not in CPU_RUNTIMES:
            raise ConfigError(f"flow cpu_runtime {cpu_runtime!r} is not one of {', '.join(CPU_RUNTIMES)}")
        self.cpu_runtime = cpu_runtime
        self._compiled: dict[int, object] = {}  # OpenVINO's compiled _Scoring per torch thread count

    def params(self) -> dict:
        """The hyper-parameters (device and cpu_runtime excluded), as saved in meta.json."""
        return {k: getattr(self, k) for k in PARAMS}

    # ---- fitting -------------------------------------------------------------------------------

    def _check_params(self) -> None:
        if self.pca_dim is not None and self.pca_dim < 2:
            raise ConfigError(f"flow.pca_dim={self.pca_dim} is too small; the coupling blocks need at least "
                              f"2 dimensions (use null for the automatic rule)")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"flow.val_fraction={self.val_fraction} must be in [0, 1); 0.2 is typical")
        if self.n_blocks < 1 or self.hidden < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"flow.n_blocks={self.n_blocks}, hidden={self.hidden}, epochs={self.epochs} and "
                              f"batch_size={self.batch_size} must all be >= 1")

    def _check_reference(self, features, groups, tiles) -> tuple[np.ndarray, np.ndarray]:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2:
            raise ConfigError(f"reference features must be a 2-d array (tiles, dims), got shape {features.shape}")
        n, d = features.shape
        tiles = np.arange(n) if tiles is None else np.asarray(tiles)
        groups = tiles if groups is None else np.asarray(groups)
        if groups.shape != (n,) or tiles.shape != (n,):
            raise ConfigError(f"groups and tiles must give one value per feature row ({n}), got shapes "
                              f"{groups.shape} and {tiles.shape}")
        if n == 0:
            raise ConfigError("the reference holds no tiles (0 feature rows); point fit-reference at slides or "
                              "tile folders with good tissue")
        n = len(np.unique(tiles))
        if n < self.min_reference:
            raise ConfigError(f"got {n} reference tiles; the flow needs at least {self.min_reference}, "
                              f"add reference tiles or lower flow.min_reference")
        if d < 2:
            raise ConfigError(f"reference features have {d} dimension; the flow needs at least 2")
        _check_finite(features, "reference")
        return features, groups

    def _n_components(self, n_train: int, d: int) -> int | None:
        """Number of PCA components, or None for no PCA (module docstring: PCA rule)."""
        if self.pca_dim is None:
            k = min(d, n_train // 2)
        elif self.pca_dim >= d:
            return None
        else:
            k = self.pca_dim
            if k > n_train - 1:
                log.warning("flow.pca_dim=%d exceeds the rank of %d training tiles; using %d components",
                            k, n_train, n_train - 1)
                k = n_train - 1
        return None if k >= d else max(k, 2)

    def _fit_pca(self, s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(components (k, D), whitening std (k,)) of standardised, centred rows `s`."""
        n, d = s.shape
        if n >= d:  # eigen-decomposition of the D x D covariance: fast for many tiles
            cov = (s.T.astype(np.float64) @ s.astype(np.float64)) / max(n - 1, 1)
            evals, evecs = np.linalg.eigh(cov)
            order = np.argsort(evals)[::-1][:k]
            var, comps = evals[order], evecs[:, order].T
        else:
            _, sv, vt = np.linalg.svd(s.astype(np.float64), full_matrices=False)
            var, comps = sv[:k] ** 2 / max(n - 1, 1), vt[:k]
        comps = comps * np.where(comps[np.arange(k), np.abs(comps).argmax(1)] < 0, -1.0, 1.0)[:, None]
        std = np.sqrt(np.clip(var, 0, None))
        std = np.maximum(std, max(std[0], 1e-12) * 1e-4)
        return comps.astype(np.float32), std.astype(np.float32)

    def fit(self, features, groups=None, tiles=None) -> Flow:
        """Fit standardisation, PCA and the flow on reference features (N, D); returns self.

        `tiles` (N,) names the tile of each row (the positions of a tile; default: one row per tile), which
        `min_reference` counts; `groups` (N,) keeps the rows of a group (a tile, a slide; default: the tile)
        together on one side of the validation split; `val_rows_` are the held-out row indices.
        """
        self._check_params()
        features, groups = self._check_reference(features, groups, tiles)
        n, d = features.shape
        rng = np.random.default_rng(self.seed)
        is_val = held_out(groups, self.val_fraction, rng)
        self.val_rows_ = np.flatnonzero(is_val)
        train, val = features[~is_val], features[is_val]
        train = train[rng.permutation(len(train))]

        self.feature_dim_ = d
        self.mean_ = train.mean(0)
        std = train.std(0)
        self.scale_ = np.maximum(std, SCALE_FLOOR * float(np.median(std)) + 1e-12).astype(np.float32)
        k = self._n_components(len(train), d)
        if k is None:
            self.pca_, self.pca_std_ = None, None
        else:
            s = (train - self.mean_) / self.scale_
            self.pca_, self.pca_std_ = self._fit_pca(s - s.mean(0), k)
        self.latent_dim_ = d if k is None else k
        log.info("fitting flow on %d reference vectors (%d held out), features %d-d -> latent %d-d",
                 len(train), len(val), d, self.latent_dim_)

        device = resolve_device(self.device, "flow")
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            self.inn_ = _build_inn(self.latent_dim_, self.n_blocks, self.hidden, self.clamp, rng).to(device)
            self.history_ = self._train(self._prepare(train, device), self._prepare(val, device), rng)
        self.inn_.eval()
        self._compiled = {}
        self.mu_ = self._latent(train, self.inn_)[0].mean(0)
        return self

    def _prepare(self, features: np.ndarray, device: torch.device) -> torch.Tensor:
        """Flow input u of raw features, as a tensor on `device`."""
        u = (features - self.mean_) / self.scale_
        if self.pca_ is not None:
            u = (u @ self.pca_.T) / self.pca_std_
        return torch.as_tensor(np.ascontiguousarray(u, dtype=np.float32), device=device)

    def _nll_batch(self, u: torch.Tensor) -> torch.Tensor:
        z, log_jac = self.inn_(u)
        return (0.5 * (z ** 2).sum(1) - log_jac) / u.shape[1] + HALF_LOG_2PI

    def _eval_nll(self, u: torch.Tensor) -> float:
        self.inn_.eval()
        with torch.inference_mode():
            return float(torch.cat([self._nll_batch(b) for b in u.split(8192)]).mean())

    def _train_epoch(self, u: torch.Tensor, opt, params, rng: np.random.Generator) -> float | None:
        """One pass over shuffled batches; mean training NLL/dim, or None when the loss is not finite."""
        self.inn_.train()
        n, total = len(u), 0.0
        for idx in np.array_split(rng.permutation(n), max(1, math.ceil(n / self.batch_size))):
            loss = self._nll_batch(u[torch.as_tensor(idx, device=u.device)]).mean()
            if not torch.isfinite(loss):
                return None
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            total += loss.item() * len(idx)
        return total / n

    def _train(self, u_train: torch.Tensor, u_val: torch.Tensor, rng: np.random.Generator) -> dict:
        params = [p for p in self.inn_.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        history: dict = {"train": [], "val": [], "best_epoch": 0}
        best, best_state, stale = math.inf, None, 0
        bar = tqdm(range(self.epochs), desc="flow", unit="epoch", leave=False, disable=None)
        for epoch in bar:
            train_nll = self._train_epoch(u_train, opt, params, rng)
            if train_nll is None:
                log.warning("flow training diverged at epoch %d (non-finite loss); keeping epoch %d",
                            epoch, history["best_epoch"])
                break
            history["train"].append(train_nll)
            history["val"].append(self._eval_nll(u_val) if len(u_val) else train_nll)
            bar.set_postfix(train=f"{train_nll:.3f}", val=f"{history['val'][-1]:.3f}")
            if history["val"][-1] < best - 1e-4:
                best, stale, history["best_epoch"] = history["val"][-1], 0, epoch
                best_state = {k: v.detach().clone() for k, v in self.inn_.state_dict().items()}
            else:
                stale += 1
            if len(u_val) and stale >= self.patience:
                break
        bar.close()
        if best_state is None:
            raise ConfigError("flow training diverged in its first epoch (non-finite loss); lower flow.lr or "
                              "flow.clamp, or check the reference features")
        self.inn_.load_state_dict(best_state)
        return history

    # ---- use -----------------------------------------------------------------------------------

    def _check_features(self, features) -> np.ndarray:
        if not hasattr(self, "inn_"):
            raise NotFittedError("this Flow is not fitted; call .fit(reference_features) or Flow.load(path) first")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim_:
            raise ConfigError(f"features have shape {features.shape} but the flow was fitted on "
                              f"{self.feature_dim_}-d features; encode the tiles with the scorer's encoder "
                              f"and pooling (or refit the flow)")
        _check_finite(features, "feature")
        return features

    def _forward(self):
        """u -> (z, log|det J|) of the fitted flow: FrEIA's SequenceINN, or, on the CPU with cpu_runtime openvino,
        its _Scoring copy in OpenVINO (converted once, cpu_runtime.openvino_model), compiled for OPENVINO_ROWS rows,
        fp32, once per torch thread count (run.threads)."""
        if self.cpu_runtime == "torch" or next(self.inn_.parameters()).device.type != "cpu":
            return self.inn_
        threads = torch.get_num_threads()
        if threads not in self._compiled:
            ov = import_runtime("openvino", "flow.cpu_runtime")
            module = _Scoring(self.inn_)
            model = openvino_model(module, torch.zeros(2, self.latent_dim_),
                                   {"kind": "flow", "splits": module.splits, "clamp": module.clamp,
                                    "log_scale": module.log_scale}, code=(_subnet,))
            model.reshape([OPENVINO_ROWS, self.latent_dim_])
            self._compiled[threads] = ov.Core().compile_model(model, "CPU", openvino_settings(threads))
        compiled = self._compiled[threads]

        def forward(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            padded = torch.cat([u, u.new_zeros(-len(u) % OPENVINO_ROWS, u.shape[1])])
            out = torch.cat([torch.from_numpy(compiled(chunk.numpy())[0])  # copies (share_outputs=False)
                             for chunk in padded.split(OPENVINO_ROWS)])[:len(u)]
            return out[:, :-1], out[:, -1]
        return forward

    def _latent(self, features: np.ndarray, forward) -> tuple[np.ndarray, np.ndarray]:
        """(z, log|det J|) of checked features through `forward`, in batches."""
        device = next(self.inn_.parameters()).device
        zs, jacs = [], []
        with torch.inference_mode():
            for start in range(0, len(features), 8192):
                z, jac = forward(self._prepare(features[start:start + 8192], device))
                zs.append(z.float().cpu().numpy())
                jacs.append(jac.float().cpu().numpy())
        if not zs:
            return np.zeros((0, self.latent_dim_), np.float32), np.zeros(0, np.float32)
        return np.concatenate(zs), np.concatenate(jacs)

    def latent_and_log_jac(self, features) -> tuple[np.ndarray, np.ndarray]:
        """(z (N, D'), log|det J| (N,)) of features (N, D), in batches."""
        features = self._check_features(features)
        self.inn_.eval()
        return self._latent(features, self._forward())

    def transform(self, features) -> np.ndarray:
        """Latent z (N, D') float32 of features (N, D)."""
        return self.latent_and_log_jac(features)[0]

    @staticmethod
    def nll_of(z: np.ndarray, log_jac: np.ndarray) -> np.ndarray:
        """Negative log-likelihood per latent dimension (N,) float32 of latents and their log-determinants."""
        d = z.shape[1]
        return (0.5 * (z.astype(np.float64) ** 2).sum(1) / d + HALF_LOG_2PI - log_jac / d).astype(np.float32)

    def nll(self, features) -> np.ndarray:
        """Negative log-likelihood per latent dimension (N,) float32; higher = less like the reference."""
        return self.nll_of(*self.latent_and_log_jac(features))

    # ---- save / load ---------------------------------------------------------------------------

    def save(self, path_dir, meta: dict) -> Path:
        """Write flow.safetensors and meta.json (meta + flow parameters, dims, version, fingerprint)."""
        if not hasattr(self, "inn_"):
            raise NotFittedError("this Flow is not fitted; call .fit(reference_features) before .save()")
        path_dir = Path(path_dir)
        path_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"inn.{k}": v.detach().cpu().contiguous() for k, v in self.inn_.state_dict().items()}
        arrays = {"mean": self.mean_, "scale": self.scale_, "mu": self.mu_}
        if self.pca_ is not None:
            arrays |= {"pca": self.pca_, "pca_std": self.pca_std_}
        tensors |= {k: torch.as_tensor(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}
        weights = path_dir / WEIGHTS_FILE
        save_file(tensors, str(weights))
        out = dict(meta)
        out.update({"format_version": FORMAT_VERSION, "wsi_qc_version": __version__, "flow": self.params(),
                    "feature_dim": self.feature_dim_, "latent_dim": self.latent_dim_,
                    "history": self.history_})
        out["fingerprint"] = _fingerprint(weights, out)
        (path_dir / META_FILE).write_text(json.dumps(out, indent=2, sort_keys=True))
        return path_dir

    @classmethod
    def load(cls, path_dir, device: str = "cpu", check_meta=None, cpu_runtime: str = "torch") -> tuple[Flow, dict]:
        """(flow, meta) from a directory written by save(); `check_meta(meta)` runs before the fingerprint check
        (the Scorer refuses other scorer formats there, and checks what the meta binds)."""
        path_dir = Path(path_dir)
        if not path_dir.is_dir():
            raise ConfigError(f"scorer directory {path_dir} does not exist; pass the directory written by "
                              f"wsi-qc fit-reference")
        for name in (WEIGHTS_FILE, META_FILE):
            if not (path_dir / name).is_file():
                raise ConfigError(f"{path_dir / name} is missing; {path_dir} is not a complete scorer, refit with "
                                  f"wsi-qc fit-reference")
        try:
            meta = json.loads((path_dir / META_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path_dir / META_FILE} is not valid JSON ({exc}); refit with wsi-qc "
                              f"fit-reference") from exc
        if not isinstance(meta, dict):
            raise ConfigError(f"{path_dir / META_FILE} holds a {type(meta).__name__}, not a scorer's meta; refit "
                              f"with wsi-qc fit-reference")
        have = meta.get("format_version")
        if have != FORMAT_VERSION:
            raise ConfigError(f"{path_dir / META_FILE} has flow format {have} (written by wsi-qc "
                              f"{meta.get('wsi_qc_version', 'unknown')}) but wsi-qc {__version__} reads format "
                              f"{FORMAT_VERSION}; refit with wsi-qc fit-reference")
        if check_meta is not None:
            check_meta(meta)
        fingerprint = _fingerprint(path_dir / WEIGHTS_FILE, meta)
        if fingerprint != meta.get("fingerprint"):
            raise ConfigError(f"{path_dir} has fingerprint {fingerprint} but {META_FILE} records "
                              f"{meta.get('fingerprint')}: {WEIGHTS_FILE} or {META_FILE} was changed or mixed with "
                              f"another scorer's; refit with wsi-qc fit-reference")
        try:  # a well-formed pair of files from save(); anything else is named, not a traceback
            flow = cls(**meta["flow"], device=device, cpu_runtime=cpu_runtime)
            tensors = load_file(str(path_dir / WEIGHTS_FILE))
            flow.feature_dim_, flow.latent_dim_ = int(meta["feature_dim"]), int(meta["latent_dim"])
            flow.mean_, flow.scale_, flow.mu_ = (tensors[k].numpy() for k in ("mean", "scale", "mu"))
            flow.pca_ = tensors["pca"].numpy() if "pca" in tensors else None
            flow.pca_std_ = tensors["pca_std"].numpy() if "pca_std" in tensors else None
            with torch.random.fork_rng(devices=[]):  # subnet init draws are overwritten by the saved weights
                inn = _build_inn(flow.latent_dim_, flow.n_blocks, flow.hidden, flow.clamp, None)
            inn.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("inn.")})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{path_dir} is not a well-formed scorer ({type(exc).__name__}: {str(exc)[:200]}); "
                              f"refit with wsi-qc fit-reference") from exc
        flow.inn_ = inn.to(resolve_device(device, "flow")).eval()
        flow.history_ = meta.get("history", {})
        return flow, meta
