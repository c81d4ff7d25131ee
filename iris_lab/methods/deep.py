"""deepIRIS²: fully connected networks from Mg II h&k profiles to stratifications.

One fully connected ReLU + dropout network per quantity (temperature, v_los,
v_turb, log n_e) maps the 473-point IRIS Mg II h&k profile to the 39-point
stratification in log τ500, and one more network per quantity predicts that
quantity's uncertainty σ (the database σ of eq. 2 of Sainz Dalda et al. 2019,
learned in log space). A small auxiliary emulator network maps the predicted
stratification back to the profile, so every pixel gets a χ² and a quality
flag like the IRIS² look-up.

Normalisation (identical for the database and for observed rasters)
--------------------------------------------------------------------
* Input: ``x = (log10(max(I, floor)) - mean_λ) / std_λ`` with ``I`` the
  specific intensity in erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹ (rasters in DN/s are converted
  with :func:`iris_lab.instrument.iris_dn_to_intensity`), ``floor`` = 10⁻³ ×
  the median training intensity, and the mean/std per wavelength taken over
  the training split. The absolute level is kept on purpose: it carries the
  temperature information that a peak-normalised profile would lose. The
  standardised profile is then projected on the leading ``n_components``
  principal components of the training profiles (a fixed, shared first linear
  layer: it removes the noise-dominated directions and makes a 220,000-pixel
  raster a few seconds of work).
* Targets: log10 T [K], v_los and v_turb in km s⁻¹, log10 n_e [cm⁻³],
  standardised per log τ point; σ targets are log10 σ (σ_T in K, σ_v in
  cm s⁻¹, σ_log n_e in dex), standardised per log τ point.

The networks of one kind share an input and are evaluated together (a single
batched matrix product per layer), but their weights are independent and are
stored per network in the safetensors file (``temperature.layer0.weight`` …).

Example
-------
>>> from iris_lab.methods.deep import DeepIRIS2
>>> model = DeepIRIS2.load()  # the shipped weights          # doctest: +SKIP
>>> result = model.predict(raster)  # (y, x, wavelength) DataArray  # doctest: +SKIP
>>> result.temperature.sel(log_tau=-3.0).plot()              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.nn import functional as F

from iris_lab.methods.iris2 import check_schema
from iris_lab.methods.result import result_dataset

#: Quantities predicted per log τ point, in network order.
QUANTITIES: tuple[str, ...] = ("temperature", "v_los", "v_turb", "log_n_e")
#: Database variable holding the σ of each quantity.
SIGMA_VARIABLES: dict[str, str] = {
    "temperature": "sigma_temperature",
    "v_los": "sigma_v_los",
    "v_turb": "sigma_v_turb",
    "log_n_e": "sigma_log_n_e",
}
#: Output variable, units of the value and of its σ.
OUTPUT_UNITS: dict[str, tuple[str, str, str]] = {
    "temperature": ("temperature", "K", "K"),
    "v_los": ("v_los", "cm / s", "cm / s"),
    "v_turb": ("v_turb", "cm / s", "cm / s"),
    "log_n_e": ("n_e", "1 / cm3", "dex"),
}
#: Quality bits of :meth:`DeepIRIS2.predict`.
FLAG_MEANINGS: tuple[str, ...] = ("masked", "low_signal", "high_chi2", "partly_masked",
                                  "out_of_range")
FLAG_MASKS: tuple[int, ...] = (1, 2, 4, 8, 16)
FILE_FORMAT = "iris_lab.deepiris2"
FILE_VERSION = "1"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "data" / "deepiris2.safetensors"
_CHECKPOINT_NAME = "deepiris2_checkpoint.pt"
# Smallest per-wavelength scale [dex] of the standardised log intensity.
_INPUT_STD_FLOOR = 0.01
# Standardised inputs are clipped to ± this before the networks (no wild extrapolation).
_INPUT_CLIP = 10.0
# Fraction of masked samples above which a pixel gets no prediction.
_MASKED_FRACTION = 0.5
# A standardised input beyond this many σ of the training set is "out of range" ...
_OUT_OF_RANGE_Z = 6.0
# ... and a pixel with more than this fraction of such samples is flagged.
_OUT_OF_RANGE_FRACTION = 0.05


class _StackedMLP(nn.Module):
    """``n`` independent fully connected ReLU + dropout networks on a shared input.

    Layer ``l`` of network ``k`` is ``weights[l][k]`` (in, out) and
    ``biases[l][k]`` (1, out); all networks are evaluated with one batched
    matrix product per layer.
    """

    def __init__(self, n_networks: int, n_in: int, hidden: tuple[int, ...], n_out: int,
                 dropout: float) -> None:
        super().__init__()
        sizes = [n_in, *hidden, n_out]
        self.n_networks = n_networks
        self.dropout = dropout
        pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(n_networks, a, b)) for a, b in pairs)
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(n_networks, 1, b)) for b in sizes[1:])
        for w in self.weights:
            bound = float(np.sqrt(6.0 / w.shape[1]))  # He-uniform for ReLU
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, n_in) → (n_networks, batch, n_out)."""
        w0 = self.weights[0]
        n, n_in, h0 = w0.shape
        h = (x @ w0.permute(1, 0, 2).reshape(n_in, n * h0)).view(-1, n, h0).transpose(0, 1)
        h = h + self.biases[0]
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = torch.relu_(h) if not self.training else torch.relu(h)
            h = F.dropout(h, self.dropout, self.training)
            h = torch.baddbmm(b, h, w)
        return h


def _emulator(n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.Sequential:
    sizes = [n_in, *hidden, n_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _open_database(database: xr.Dataset | str | os.PathLike) -> xr.Dataset:
    if isinstance(database, xr.Dataset):
        return database
    path = Path(database)
    if not path.exists():
        raise ValueError(f"database file {path} does not exist")
    return xr.load_dataset(path, engine="h5netcdf")


def _check_database(db: xr.Dataset) -> None:
    needed = ["profile", "temperature", "v_los", "v_turb", "n_e", *SIGMA_VARIABLES.values()]
    check_schema(db, needed)
    if db.sizes["entry"] < 10:
        raise ValueError(f"database has {db.sizes['entry']} entries; at least 10 are needed")


def _targets(db: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Network-space targets (entry, 4, depth) and log10 σ (entry, 4, depth), float64."""
    tiny = 1e-30
    values = np.stack([
        np.log10(np.maximum(db["temperature"].values.astype(np.float64), tiny)),
        db["v_los"].values.astype(np.float64) / 1e5,
        db["v_turb"].values.astype(np.float64) / 1e5,
        np.log10(np.maximum(db["n_e"].values.astype(np.float64), tiny)),
    ], axis=1)
    sigmas = np.stack([db[SIGMA_VARIABLES[q]].values.astype(np.float64) for q in QUANTITIES],
                      axis=1)
    # σ = 0 (a perfectly constrained node) would be -inf in log space: floor each
    # quantity at 10⁻³ of its median positive σ.
    for k in range(len(QUANTITIES)):
        s = sigmas[:, k]
        positive = s[np.isfinite(s) & (s > 0)]
        floor = 1e-3 * np.median(positive) if positive.size else 1.0
        sigmas[:, k] = np.log10(np.maximum(np.where(np.isfinite(s), s, np.nan), floor))
    return values, sigmas


def _standardise_stats(a: np.ndarray, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over entries (axis 0); each std at least ``floor`` and at least 10⁻³ of
    the largest std of its row (so that an almost constant column is not blown up)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (σ not known)
        mean = np.nan_to_num(np.nanmean(a, axis=0))
        std = np.nan_to_num(np.nanstd(a, axis=0))
    top = std.max(axis=-1, keepdims=True) if std.ndim > 1 else std.max()
    std = np.maximum(std, np.maximum(1e-3 * top, floor))
    return mean, np.where(std > 0, std, 1.0)


class DeepIRIS2:
    """deepIRIS²: one network per quantity plus one σ network per quantity.

    Parameters
    ----------
    hidden_sizes
        Widths of the hidden layers of every network (input 473, output 39).
    dropout
        Dropout probability after every hidden ReLU (training only).
    lr
        Adam learning rate.
    max_epochs
        Upper limit of training epochs.
    patience
        Early stopping: training stops when no network's validation loss
        improved for this many epochs; each network keeps its best epoch.
    batch_size
        Training mini-batch size.
    seed
        Seed of the 80/20 split, of the initial weights, of the shuffling and of
        dropout; a fit with the same seed, data and thread count is bitwise
        reproducible, also when resumed from a checkpoint.
    device
        Torch device for training and prediction ("cpu", "cuda", ...).
    validation_fraction
        Fraction of the database held out for validation (early stopping).
    weight_decay
        Adam L2 penalty.
    emulator_hidden
        Hidden widths of the auxiliary stratification → profile network that
        gives each pixel a χ².
    chi2_quantile
        Pixels whose χ² exceeds this quantile of the validation χ² are flagged
        ``high_chi2``.
    checkpoint_dir
        Folder for a resumable checkpoint written after every epoch; a
        later ``fit`` with the same data and parameters resumes from it.
    progress
        Show a tqdm progress bar.
    predict_batch_size
        Spectra per batch in :meth:`predict` (4096 keeps a batch's (n, λ)
        arrays near the CPU cache: 16384 was 1.5× slower on 220,000 spectra).
    n_components
        Number of principal components of the standardised training profiles
        the networks see (None: all wavelengths).
    noise_exptime
        Exposure time [s] of the IRIS photon + read noise
        (:func:`iris_lab.instrument.iris_noise_sigma`) added afresh to the
        training profiles in every batch; None trains on noise-free profiles.

    Attributes
    ----------
    networks_, emulator_
        The trained torch modules.
    normalisation_
        Dict of numpy arrays: input mean/std per wavelength, intensity floor,
        target and σ mean/std per quantity and depth.
    wavelength_, log_tau_
        Training grids.
    history_
        Per-epoch training and validation losses.
    chi2_threshold_
        χ² above which a pixel is flagged ``high_chi2``.

    Example
    -------
    >>> model = DeepIRIS2(hidden_sizes=(64, 64), max_epochs=50, seed=1)   # doctest: +SKIP
    >>> model.fit("iris_lab/data/mgii_database.nc")                       # doctest: +SKIP
    >>> model.save("weights.safetensors")                                 # doctest: +SKIP
    >>> DeepIRIS2.load("weights.safetensors").predict(raster)             # doctest: +SKIP
    """

    def __init__(self, hidden_sizes: tuple[int, ...] = (96, 96), dropout: float = 0.05,
                 lr: float = 1e-3, max_epochs: int = 300, patience: int = 20,
                 batch_size: int = 256, seed: int = 0, device: str = "cpu",
                 validation_fraction: float = 0.2, weight_decay: float = 0.0,
                 emulator_hidden: tuple[int, ...] = (96,), chi2_quantile: float = 0.995,
                 checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
                 predict_batch_size: int = 4096, n_components: int | None = 64,
                 noise_exptime: float | None = 8.0) -> None:
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.dropout = dropout
        self.lr = lr
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.validation_fraction = validation_fraction
        self.weight_decay = weight_decay
        self.emulator_hidden = tuple(int(h) for h in emulator_hidden)
        self.chi2_quantile = chi2_quantile
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.predict_batch_size = predict_batch_size
        self.n_components = n_components
        self.noise_exptime = noise_exptime

    # ------------------------------------------------------------------ set-up
    def _architecture(self) -> dict[str, Any]:
        return {"hidden_sizes": list(self.hidden_sizes), "dropout": self.dropout,
                "emulator_hidden": list(self.emulator_hidden),
                "n_wavelength": int(self.wavelength_.size), "n_depth": int(self.log_tau_.size),
                "quantities": list(QUANTITIES)}

    def _build_modules(self) -> None:
        n_in, n_depth = self._n_inputs(), self.log_tau_.size
        self.networks_ = _StackedMLP(2 * len(QUANTITIES), n_in, self.hidden_sizes, n_depth,
                                     self.dropout)
        self.emulator_ = _emulator(len(QUANTITIES) * n_depth, self.emulator_hidden, n_in)

    def _n_inputs(self) -> int:
        return int(self.normalisation_["components"].shape[1])

    def _check_params(self) -> None:
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be positive widths, got {self.hidden_sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got "
                             f"{self.validation_fraction}")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError("max_epochs, patience and batch_size must be >= 1")

    def _torch_normalisation(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device)
                for k, v in self.normalisation_.items()}

    # --------------------------------------------------------------------- fit
    def fit(self, database: xr.Dataset | str | os.PathLike) -> DeepIRIS2:
        """Train all networks on a Mg II database (netCDF path or Dataset).

        Entries with non-finite profiles, models or σ (or ``converged`` False)
        are dropped. The 80/20 split is seeded by ``seed``; the validation
        entries are in ``validation_indices_``.
        """
        from tqdm.auto import tqdm

        self._check_params()
        db = _open_database(database)
        _check_database(db)
        profile = db["profile"].transpose("entry", "wavelength").values.astype(np.float64)
        db = db.transpose("entry", "log_tau", ...)
        values, log_sigma = _targets(db)
        good = np.isfinite(profile).all(1) & np.isfinite(values).all((1, 2))
        if "converged" in db:
            good &= db["converged"].values.astype(bool)
        if good.sum() < 10:
            raise ValueError(f"only {int(good.sum())} usable database entries (need >= 10)")
        self.n_entries_ = int(good.sum())
        self.database_indices_ = np.flatnonzero(good)
        profile, values, log_sigma = profile[good], values[good], log_sigma[good]
        # Entries without σ (no response functions and no regression fill-in)
        # train the value networks only; the σ networks learn from the others.
        has_sigma = np.isfinite(log_sigma).all(2)  # (entry, quantity)
        if (has_sigma.sum(0) < 2).any():
            raise ValueError(f"σ is known for only {has_sigma.sum(0).tolist()} entries per "
                             f"quantity {list(QUANTITIES)}; at least 2 are needed")
        log_sigma = np.where(has_sigma[..., None], log_sigma, np.nan)
        self.n_sigma_entries_ = has_sigma.sum(0)

        rng = np.random.default_rng(self.seed)
        order = rng.permutation(profile.shape[0])
        n_val = max(1, int(round(self.validation_fraction * profile.shape[0])))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        self.validation_indices_ = self.database_indices_[val_idx]

        self.wavelength_ = db["wavelength"].values.astype(np.float64)
        self.log_tau_ = db["log_tau"].values.astype(np.float64)
        self.mu_ = float(db.attrs.get("mu", db["profile"].attrs.get("mu", np.nan)))
        self.provenance_ = {k: str(v) for k, v in db.attrs.items()}

        floor = 1e-3 * float(np.median(profile[train_idx]))
        if not floor > 0:
            raise ValueError("database profiles have a non-positive median intensity")
        log_profile = np.log10(np.maximum(profile, floor))
        t_mean, t_std = _standardise_stats(values[train_idx])
        s_mean, s_std = _standardise_stats(log_sigma[train_idx])
        # IRIS-like photon + read noise (an exposure of noise_exptime s) is added
        # to the training profiles afresh in every batch, so that the networks
        # see what a raster holds; one fixed realisation sets the input scales
        # and the validation inputs.
        noise_sigma = self._noise_sigma(profile)
        noisy = profile + noise_sigma * rng.standard_normal(profile.shape)
        log_noisy = np.log10(np.maximum(noisy, floor))
        # A wavelength whose intensity hardly varies over the database (a far
        # wing) must not turn noise into a huge input: its scale is at least
        # _INPUT_STD_FLOOR dex (2.3 %).
        in_mean, in_std = _standardise_stats(log_noisy[train_idx], _INPUT_STD_FLOOR)
        peaks = profile[train_idx].max(1)
        self.normalisation_ = {
            "intensity_floor": np.float64(floor), "input_mean": in_mean, "input_std": in_std,
            "target_mean": t_mean, "target_std": t_std, "sigma_mean": s_mean,
            "sigma_std": s_std, "signal_floor": np.float64(0.5 * np.quantile(peaks, 0.001)),
        }
        z = (log_profile - in_mean) / in_std
        n_comp = min(self.n_components or z.shape[1], z.shape[1], train_idx.size)
        # principal axes of the training profiles (eigenvectors of their scatter
        # matrix, largest first; sign fixed so that the largest |loading| is > 0)
        evals, evecs = np.linalg.eigh(z[train_idx].T @ z[train_idx])
        components = evecs[:, ::-1][:, :n_comp]
        flip = np.sign(components[np.abs(components).argmax(0), np.arange(n_comp)])
        components = components * flip
        self.normalisation_["components"] = components
        self.explained_variance_ratio_ = evals[::-1][:n_comp] / evals.sum()
        c_clean = (z @ components).astype(np.float32)
        x_val = (np.clip((log_noisy[val_idx] - in_mean) / in_std, -_INPUT_CLIP, _INPUT_CLIP)
                 @ components).astype(np.float32)
        y = np.concatenate([(values - t_mean) / t_std, (log_sigma - s_mean) / s_std],
                           axis=1).astype(np.float32)  # (entry, 8, depth)

        device = torch.device(self.device)
        y_t = torch.from_numpy(y).to(device)
        val_counts = np.concatenate([np.full(len(QUANTITIES), val_idx.size),
                                     has_sigma[val_idx].sum(0), [val_idx.size]])
        c_t = torch.from_numpy(c_clean).to(device)
        x_val_t = torch.from_numpy(x_val).to(device)
        intensity_t = torch.from_numpy(profile.astype(np.float32)).to(device)
        noise_t = torch.from_numpy(noise_sigma.astype(np.float32)).to(device)
        norm_t = self._torch_normalisation(device)
        tr = torch.from_numpy(train_idx).to(device)
        va = torch.from_numpy(val_idx).to(device)
        n_nets = 2 * len(QUANTITIES) + 1  # + the emulator

        with self._seeded(self.seed):
            self._build_modules()
        self.networks_.to(device)
        self.emulator_.to(device)
        params = [*self.networks_.parameters(), *self.emulator_.parameters()]
        optimiser = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        best_loss = np.full(n_nets, np.inf)
        best_epoch = np.zeros(n_nets, dtype=np.int64)
        best_state = self._state_copy()
        history: dict[str, list] = {"train": [], "validation": []}
        start = 0

        ckpt_path, fingerprint = None, None
        if self.checkpoint_dir is not None:
            ckpt_dir = Path(self.checkpoint_dir)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt_path = ckpt_dir / _CHECKPOINT_NAME
            fingerprint = self._fingerprint(c_clean, y, train_idx)
            if ckpt_path.exists():
                ck = self._read_checkpoint(ckpt_path, fingerprint)
                self._load_state(ck["state"])
                optimiser.load_state_dict(ck["optimiser"])
                best_state = ck["best_state"]
                best_loss = ck["best_loss"].numpy().astype(np.float64)
                best_epoch = ck["best_epoch"].numpy().astype(np.int64)
                history = {"train": ck["history_train"].tolist(),
                           "validation": ck["history_validation"].tolist()}
                start = int(ck["epoch"])

        bar = tqdm(range(start, self.max_epochs), desc="deepIRIS² training",
                   disable=not self.progress, initial=start, total=self.max_epochs)
        for epoch in bar:
            if epoch - int(best_epoch.max()) >= self.patience and epoch > 0:
                break
            with self._seeded(self.seed * 100_003 + epoch + 1):
                gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                perm = tr[torch.randperm(tr.numel(), generator=gen).to(device)]
                train_loss = self._train_epoch(intensity_t, noise_t, norm_t, c_t, y_t, perm,
                                               optimiser)
            val_loss = self._losses(x_val_t, c_t[va], y_t[va])
            # a σ network without validation entries stops on its training loss
            val_loss = np.where(val_counts > 0, val_loss, train_loss)
            history["train"].append(train_loss.tolist())
            history["validation"].append(val_loss.tolist())
            improved = val_loss < best_loss
            best_loss = np.where(improved, val_loss, best_loss)
            best_epoch = np.where(improved, epoch, best_epoch)
            if improved.any():
                best_state = self._merge_best(best_state, improved)
            bar.set_postfix(val=f"{float(val_loss.sum()):.4g}", best=int(best_epoch.max()))
            if ckpt_path is not None:
                self._write_checkpoint(ckpt_path, fingerprint, epoch + 1, optimiser, best_state,
                                       best_loss, best_epoch, history)
        bar.close()

        self._load_state(best_state)
        self.history_ = history
        self.best_epoch_ = {name: int(e) for name, e in
                            zip([*QUANTITIES, *(f"sigma_{q}" for q in QUANTITIES), "emulator"],
                                best_epoch, strict=True)}
        self.best_validation_loss_ = best_loss
        z_val = np.clip((log_noisy[val_idx] - in_mean) / in_std, -_INPUT_CLIP, _INPUT_CLIP)
        chi2 = self._forward(torch.from_numpy(z_val.astype(np.float32)).to(device))["chi2"]
        chi2 = chi2.cpu().numpy()
        self.chi2_threshold_ = float(np.quantile(chi2, self.chi2_quantile))
        return self

    @staticmethod
    @contextlib.contextmanager
    def _seeded(seed: int) -> Iterator[None]:
        """Seed torch's generator without touching the caller's random state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) % (2**63))
            yield

    def _noise_sigma(self, profile: np.ndarray) -> np.ndarray:
        """1σ IRIS photon + read noise [intensity units] for an exposure of noise_exptime s."""
        if not self.noise_exptime:
            return np.zeros_like(profile)
        from iris_lab import instrument

        t = float(self.noise_exptime)
        dn = instrument.iris_intensity_to_dn(profile, t, wavelength=self.wavelength_)
        sigma_dn_per_s = instrument.iris_noise_sigma(dn) / t
        return np.asarray(instrument.iris_dn_to_intensity(sigma_dn_per_s,
                                                          wavelength=self.wavelength_),
                          dtype=np.float64)

    @staticmethod
    def _components_of(intensity: torch.Tensor, n: dict[str, torch.Tensor]) -> torch.Tensor:
        """Intensities (batch, wavelength) → clipped standardised log → components."""
        x = (torch.log10(intensity.clamp_min(n["intensity_floor"])) - n["input_mean"]) \
            / n["input_std"]
        return x.clamp(-_INPUT_CLIP, _INPUT_CLIP) @ n["components"]

    def _train_epoch(self, intensity: torch.Tensor, noise: torch.Tensor,
                     norm: dict[str, torch.Tensor], c_clean: torch.Tensor, y: torch.Tensor,
                     perm: torch.Tensor, optimiser: torch.optim.Optimizer) -> np.ndarray:
        self.networks_.train()
        self.emulator_.train()
        total = np.zeros(2 * len(QUANTITIES) + 1)
        n_seen = 0
        for start in range(0, perm.numel(), self.batch_size):
            idx = perm[start:start + self.batch_size]
            observed = intensity[idx] + noise[idx] * torch.randn_like(noise[idx])
            x = self._components_of(observed, norm)
            losses = self._batch_losses(x, c_clean[idx], y[idx])
            optimiser.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimiser.step()
            total += losses.detach().cpu().numpy() * idx.numel()
            n_seen += idx.numel()
        return total / max(n_seen, 1)

    def _batch_losses(self, x: torch.Tensor, c_clean: torch.Tensor, y: torch.Tensor
                      ) -> torch.Tensor:
        """Mean squared error of each network (8 value/σ networks + emulator).

        ``x``: input components (noisy profile); ``c_clean``: components of the
        noise-free profile, the emulator's target.
        """
        out = self.networks_(x)  # (8, batch, depth)
        target = y.transpose(0, 1)
        known = torch.isfinite(target)  # σ may be unknown for some entries
        sq = torch.where(known, out - torch.where(known, target, 0.0), 0.0) ** 2
        net_loss = sq.sum(dim=(1, 2)) / known.sum(dim=(1, 2)).clamp_min(1)
        n_q = len(QUANTITIES)
        emu = self.emulator_(y[:, :n_q].reshape(y.shape[0], -1))
        emu_loss = ((emu - c_clean) ** 2).mean().unsqueeze(0)
        return torch.cat([net_loss, emu_loss])

    @torch.inference_mode()
    def _losses(self, x: torch.Tensor, c_clean: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        self.networks_.eval()
        self.emulator_.eval()
        total = np.zeros(2 * len(QUANTITIES) + 1)
        for start in range(0, x.shape[0], 8192):
            sl = slice(start, start + 8192)
            total += self._batch_losses(x[sl], c_clean[sl], y[sl]).cpu().numpy() * \
                x[sl].shape[0]
        return total / x.shape[0]

    # ----------------------------------------------------------- state helpers
    def _state_copy(self) -> dict[str, torch.Tensor]:
        state = {f"networks.{k}": v.detach().clone() for k, v in
                 self.networks_.state_dict().items()}
        state.update({f"emulator.{k}": v.detach().clone() for k, v in
                      self.emulator_.state_dict().items()})
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.networks_.load_state_dict(
            {k[len("networks."):]: v for k, v in state.items() if k.startswith("networks.")})
        self.emulator_.load_state_dict(
            {k[len("emulator."):]: v for k, v in state.items() if k.startswith("emulator.")})

    def _merge_best(self, best: dict[str, torch.Tensor], improved: np.ndarray
                    ) -> dict[str, torch.Tensor]:
        current = self._state_copy()
        merged = dict(best)
        n_stack = 2 * len(QUANTITIES)
        rows = torch.from_numpy(np.flatnonzero(improved[:n_stack]))
        for key, value in current.items():
            if key.startswith("networks.") and rows.numel():
                merged[key] = best[key].clone()
                merged[key][rows.to(value.device)] = value[rows.to(value.device)]
            elif key.startswith("emulator.") and improved[-1]:
                merged[key] = value
        return merged

    def _fingerprint(self, x: np.ndarray, y: np.ndarray, train_idx: np.ndarray) -> str:
        h = hashlib.sha256()
        for a in (x, y, train_idx):
            h.update(np.ascontiguousarray(a).tobytes())
        config = {"hidden_sizes": self.hidden_sizes, "dropout": self.dropout, "lr": self.lr,
                  "batch_size": self.batch_size, "seed": self.seed,
                  "weight_decay": self.weight_decay, "emulator_hidden": self.emulator_hidden,
                  "n_components": self.n_components, "noise_exptime": self.noise_exptime,
                  "validation_fraction": self.validation_fraction}
        h.update(json.dumps(config, sort_keys=True, default=list).encode())
        return h.hexdigest()

    def _write_checkpoint(self, path: Path, fingerprint: str, epoch: int,
                          optimiser: torch.optim.Optimizer, best_state: dict,
                          best_loss: np.ndarray, best_epoch: np.ndarray,
                          history: dict[str, list]) -> None:
        payload = {
            "fingerprint": fingerprint, "epoch": epoch, "state": self._state_copy(),
            "optimiser": optimiser.state_dict(), "best_state": best_state,
            "best_loss": torch.from_numpy(np.asarray(best_loss, dtype=np.float64)),
            "best_epoch": torch.from_numpy(np.asarray(best_epoch, dtype=np.int64)),
            "history_train": torch.tensor(history["train"], dtype=torch.float64),
            "history_validation": torch.tensor(history["validation"], dtype=torch.float64),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint

    @staticmethod
    def _read_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file is reported the same way
            raise ValueError(f"checkpoint {path} is corrupt or unreadable ({exc}); delete it to "
                             "start afresh") from exc
        if not isinstance(ck, dict) or ck.get("fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {path} belongs to other data or parameters; delete it "
                             "or use another checkpoint_dir")
        return ck

    # ----------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "networks_"):
            raise ValueError("DeepIRIS2 is not fitted: call fit() or DeepIRIS2.load() first")

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, observed: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """Standardised profiles (n, wavelength) → standardised outputs and χ².

        ``observed`` (n, wavelength) bool restricts χ² to unmasked samples.
        """
        self.networks_.eval()
        self.emulator_.eval()
        comps = torch.as_tensor(self.normalisation_["components"], dtype=x.dtype,
                                device=x.device)
        c = x @ comps
        out = self.networks_(c)  # (8, n, depth)
        n_q = len(QUANTITIES)
        values = out[:n_q].transpose(0, 1)  # (n, 4, depth)
        emu = self.emulator_(values.reshape(values.shape[0], -1))
        if observed is None:
            # |x - V ĉ|² = |c - ĉ|² + |x|² - |c|² for orthonormal columns V
            chi2 = (((emu - c) ** 2).sum(1) + (x * x).sum(1) - (c * c).sum(1)).clamp_min(0.0)
            chi2 = chi2 / x.shape[1]
        else:
            w = observed.to(x.dtype)
            chi2 = (((emu @ comps.T - x) ** 2) * w).sum(1) / w.sum(1).clamp_min(1.0)
        return {"values": values, "log_sigma": out[n_q:].transpose(0, 1), "chi2": chi2}

    def _raster_intensity(self, raster: xr.DataArray) -> np.ndarray:
        """The raster's intensity on the training grid, CGS, NaN where masked.

        The same conversion as the IRIS² look-up (DN/s → intensity, ``mask``
        coordinate, linear interpolation from other grids), so that both
        methods see identical inputs.
        """
        from iris_lab.methods.iris2 import raster_on_grid

        return raster_on_grid(raster, self.wavelength_)

    def predict(self, raster: xr.DataArray) -> xr.Dataset:
        """Stratifications and σ for every pixel of a Mg II h&k raster.

        Parameters
        ----------
        raster
            ``xarray.DataArray`` with dims (y, x, wavelength) (or (y, time,
            wavelength) for a sit-and-stare), a vacuum ``wavelength`` coordinate
            in Å, ``attrs["units"]`` "DN/s" or "erg / (s cm2 sr Angstrom)", and
            NaN (or a True ``mask`` coordinate) at masked samples. Other
            wavelength grids are interpolated linearly onto the training grid
            (:func:`iris_lab.methods.iris2.raster_on_grid`, as the look-up does).

        Returns
        -------
        xarray.Dataset
            The IRIS² result layout: ``temperature``, ``v_los``, ``v_turb``,
            ``n_e`` and ``sigma_*`` (y, x, log_tau); ``chi2`` (the emulator
            residual: mean squared difference between the standardised observed
            profile and the profile the emulator network gives for the predicted
            stratification); ``index`` (-1: no database entry is used);
            ``quality`` bit flags; attrs ``method="deepiris2"``. Pixels with more
            than half of their samples masked get NaN and the ``masked`` flag.
        """
        self._check_fitted()
        if not isinstance(raster, xr.DataArray):
            raise ValueError("raster must be an xarray.DataArray with a 'wavelength' dimension")
        if "wavelength" not in raster.dims or raster.ndim != 3:
            raise ValueError(f"raster must have dims (y, x|time, wavelength), got {raster.dims}")
        raster = raster.transpose(..., "wavelength")
        spatial = raster.dims[:2]
        intensity = self._raster_intensity(raster)
        shape2 = intensity.shape[:2]
        flat = intensity.reshape(-1, intensity.shape[-1])
        n_pix, n_depth = flat.shape[0], self.log_tau_.size
        quality = np.zeros(n_pix, dtype=np.uint8)
        chi2 = np.empty(n_pix, dtype=np.float32)
        fields = {OUTPUT_UNITS[q][0]: np.empty((n_pix, n_depth), np.float32) for q in QUANTITIES}
        sigmas = {SIGMA_VARIABLES[q]: np.empty((n_pix, n_depth), np.float32) for q in QUANTITIES}
        device = torch.device(self.device)
        self.networks_.to(device)
        self.emulator_.to(device)
        n = self._torch_normalisation(device)
        step = int(self.predict_batch_size)
        # Everything per chunk in float32 torch on the device: standardise, flag,
        # predict, back to physical units.
        with torch.inference_mode():
            for start in range(0, n_pix, step):
                sl = slice(start, start + step)
                intensity_t = torch.as_tensor(flat[sl], device=device).to(torch.float32)
                finite = torch.isfinite(intensity_t)
                all_finite = bool(finite.all())
                if all_finite:       # the usual case: fewer passes over (n, λ)
                    masked_fraction = torch.zeros(intensity_t.shape[0], device=device)
                    peak = intensity_t.amax(1)
                else:
                    masked_fraction = 1.0 - finite.to(torch.float32).mean(1)
                    peak = torch.where(finite, intensity_t, -torch.inf).amax(1)
                x = (intensity_t.clamp_min(n["intensity_floor"]).log10_()
                     .sub_(n["input_mean"]).div_(n["input_std"]))
                if not all_finite:
                    x = torch.where(finite, x, 0.0)  # masked sample → training mean
                far = (x.abs() > _OUT_OF_RANGE_Z).to(torch.float32).mean(1)
                x = x.clamp_(-_INPUT_CLIP, _INPUT_CLIP)
                res = self._forward(x, None if all_finite else finite)
                dead = masked_fraction > _MASKED_FRACTION
                flags = (dead.to(torch.uint8)
                         | ((masked_fraction > 0) & ~dead).to(torch.uint8) * 8
                         | (peak < n["signal_floor"]).to(torch.uint8) * 2
                         | ((far > _OUT_OF_RANGE_FRACTION) & ~dead).to(torch.uint8) * 16
                         | ((res["chi2"] > self.chi2_threshold_) & ~dead).to(torch.uint8) * 4)
                phys = res["values"] * n["target_std"] + n["target_mean"]
                phys[dead] = torch.nan
                sig = 10.0 ** (res["log_sigma"] * n["sigma_std"] + n["sigma_mean"])
                sig[dead] = torch.nan
                c = torch.where(dead, torch.nan, res["chi2"])
                quality[sl] = flags.cpu().numpy()
                chi2[sl] = c.cpu().numpy()
                fields["temperature"][sl] = (10.0 ** phys[:, 0]).cpu().numpy()
                fields["v_los"][sl] = (phys[:, 1] * 1e5).cpu().numpy()
                fields["v_turb"][sl] = (phys[:, 2] * 1e5).cpu().numpy()
                fields["n_e"][sl] = (10.0 ** phys[:, 3]).cpu().numpy()
                for k, q in enumerate(QUANTITIES):
                    sigmas[SIGMA_VARIABLES[q]][sl] = sig[:, k].cpu().numpy()

        dims3 = (*spatial, "log_tau")
        data_vars: dict[str, Any] = {}
        for q in QUANTITIES:
            name, unit, sigma_unit = OUTPUT_UNITS[q]
            data_vars[name] = (dims3, fields[name].reshape(*shape2, n_depth), {"units": unit})
            data_vars[SIGMA_VARIABLES[q]] = (
                dims3, sigmas[SIGMA_VARIABLES[q]].reshape(*shape2, n_depth),
                {"units": sigma_unit})
        data_vars["chi2"] = (spatial, chi2.reshape(shape2), {
            "units": "", "long_name": "mean squared residual of the standardised log intensity "
                                      "against the emulated profile of the prediction"})
        data_vars["index"] = (spatial, np.full(shape2, -1, dtype=np.int64),
                              {"long_name": "database index (-1: not a look-up)"})
        return result_dataset(data_vars, raster, spatial, quality.reshape(shape2), self.log_tau_,
                              FLAG_MASKS, FLAG_MEANINGS, {
            "method": "deepiris2", "chi2_threshold": self.chi2_threshold_,
            "training_entries": self.n_entries_, "training_mu": self.mu_})

    # --------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
        """Write weights, normalisation and architecture to a safetensors file.

        ``provenance`` (how the weights were built) is stored in the metadata
        and comes back as ``training_provenance_`` from :meth:`load`.
        """
        from safetensors.torch import save_file

        self._check_fitted()
        tensors: dict[str, torch.Tensor] = {}
        names = [*QUANTITIES, *(f"sigma_{q}" for q in QUANTITIES)]
        layers = zip(self.networks_.weights, self.networks_.biases, strict=True)
        for layer, (w, b) in enumerate(layers):
            for k, name in enumerate(names):
                tensors[f"{name}.layer{layer}.weight"] = w[k].detach().cpu().contiguous()
                tensors[f"{name}.layer{layer}.bias"] = b[k, 0].detach().cpu().contiguous()
        for key, value in self.emulator_.state_dict().items():
            tensors[f"emulator.{key}"] = value.detach().cpu().contiguous()
        for key, value in self.normalisation_.items():
            tensors[f"normalisation.{key}"] = torch.as_tensor(np.atleast_1d(value),
                                                              dtype=torch.float64)
        tensors["grid.wavelength"] = torch.from_numpy(self.wavelength_.copy())
        tensors["grid.log_tau"] = torch.from_numpy(self.log_tau_.copy())
        params = {k: getattr(self, k) for k in (
            "hidden_sizes", "dropout", "lr", "max_epochs", "patience", "batch_size", "seed",
            "validation_fraction", "weight_decay", "emulator_hidden", "chi2_quantile",
            "n_components", "noise_exptime")}
        metadata = {
            "format": FILE_FORMAT, "version": FILE_VERSION,
            "architecture": json.dumps(self._architecture()),
            "parameters": json.dumps(params, default=list),
            "training": json.dumps({
                "n_entries": self.n_entries_, "mu": self.mu_,
                "chi2_threshold": self.chi2_threshold_, "best_epoch": self.best_epoch_,
                "n_epochs": len(self.history_["validation"]),
                "validation_indices": self.validation_indices_.tolist(),
                "database_provenance": self.provenance_}),
            "provenance": json.dumps(provenance if provenance is not None else
                                     getattr(self, "training_provenance_", {}), default=str),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "cpu") -> DeepIRIS2:
        """Read a model written by :meth:`save` (default: the shipped weights).

        Raises
        ------
        ValueError
            If the file is missing, corrupt, not a deepIRIS² file, or its tensors
            do not match the architecture in its metadata.
        """
        from safetensors import safe_open

        path = Path(path) if path is not None else SHIPPED_WEIGHTS
        if not path.exists():
            raise ValueError(f"deepIRIS² weight file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # every unreadable file: one clear error
            raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a deepIRIS² weight file (metadata format "
                             f"{meta.get('format')!r})")
        if meta.get("version") != FILE_VERSION:
            raise ValueError(f"{path} has deepIRIS² file version {meta.get('version')!r}; "
                             f"this code reads version {FILE_VERSION}")
        try:
            arch = json.loads(meta["architecture"])
            params = json.loads(meta["parameters"])
            training = json.loads(meta["training"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} has corrupt deepIRIS² metadata ({exc})") from exc
        if list(arch.get("quantities", [])) != list(QUANTITIES):
            raise ValueError(f"{path} predicts {arch.get('quantities')}, expected "
                             f"{list(QUANTITIES)}")
        params["hidden_sizes"] = tuple(params["hidden_sizes"])
        params["emulator_hidden"] = tuple(params["emulator_hidden"])
        model = cls(**params, device=device, progress=False)
        try:
            model.wavelength_ = tensors.pop("grid.wavelength").numpy().astype(np.float64)
            model.log_tau_ = tensors.pop("grid.log_tau").numpy().astype(np.float64)
            model.normalisation_ = {}
            for key in [k for k in tensors if k.startswith("normalisation.")]:
                value = tensors.pop(key).numpy().astype(np.float64)
                model.normalisation_[key.split(".", 1)[1]] = value if value.size > 1 else \
                    np.float64(value[0])
            if (model.wavelength_.size != arch["n_wavelength"]
                    or model.log_tau_.size != arch["n_depth"]):
                raise ValueError("grid sizes differ from the architecture")
            model._build_modules()
            names = [*QUANTITIES, *(f"sigma_{q}" for q in QUANTITIES)]
            with torch.no_grad():
                for layer, (w, b) in enumerate(zip(model.networks_.weights,
                                                   model.networks_.biases, strict=True)):
                    w.copy_(torch.stack([tensors.pop(f"{n}.layer{layer}.weight") for n in names]))
                    b.copy_(torch.stack([tensors.pop(f"{n}.layer{layer}.bias")
                                         for n in names])[:, None, :])
            emu = {k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors)
                   if k.startswith("emulator.")}
            model.emulator_.load_state_dict(emu, strict=True)
            for key in ("input_mean", "input_std", "target_mean", "target_std", "components",
                        "sigma_mean", "sigma_std", "intensity_floor", "signal_floor"):
                if key not in model.normalisation_:
                    raise ValueError(f"normalisation entry {key!r} is missing")
            if tensors:
                raise ValueError(f"unexpected tensors {sorted(tensors)[:5]}")
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path} does not match its deepIRIS² architecture ({exc})"
                             ) from exc
        model.n_entries_ = int(training["n_entries"])
        model.mu_ = float(training["mu"]) if training["mu"] is not None else float("nan")
        model.chi2_threshold_ = float(training["chi2_threshold"])
        model.best_epoch_ = dict(training["best_epoch"])
        model.validation_indices_ = np.asarray(training["validation_indices"], dtype=np.int64)
        model.provenance_ = dict(training.get("database_provenance", {}))
        model.history_ = {"train": [], "validation": []}
        try:
            model.training_provenance_ = json.loads(meta.get("provenance", "{}"))
        except json.JSONDecodeError:
            model.training_provenance_ = {}
        model.networks_.to(torch.device(device))
        model.emulator_.to(torch.device(device))
        return model
