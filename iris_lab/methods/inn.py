"""FlareINN: a Radynversion-style invertible network for flare chromospheres.

The network (Osborne, Armstrong & Fletcher 2019, ApJ 873, 128) maps an
atmosphere ``x`` — ``[log10 n_e, log10 T, sign(v) log10(|v|/1e5 + 1)]`` on the
50-point flare height grid (150 values) — onto the normalised Hα and Ca II
8542 profiles ``y`` (each divided by its own maximum) plus a latent vector
``z ~ N(0, I)`` that carries what the profiles do not constrain. Both sides are
zero-padded to a common width (384 in the paper). Run backwards with many
``z`` draws for one observed ``y``, it samples the posterior ``p(x | y)``.

The blocks are FrEIA's (``SequenceINN`` of ``GLOWCouplingBlock`` affine
couplings with an atan soft clamp, ``PermuteRandom`` in between); only the
subnetwork, the data layout, the training losses and the inference helpers
live here. Training follows the paper: forward L2 on ``y`` and the padding,
MMD on ``[y, z]`` against ``[y, N(0, I)]``, backward L2 on ``x`` (latent from
the forward pass) and MMD on ``x`` drawn with random latents, IMQ kernels whose
scale is re-chosen at the maximum of MMD²(α), a cubic fade-in ξ(n) of the
backward MMD, Adam (β1 = β2 = 0.8, ε = 1e-6) with exponential decay, early
stopping on the held-out 20 %.

Example
-------
>>> from iris_lab.methods.inn import FlareINN
>>> inn = FlareINN(width=256, hidden=32, n_latent=120)
>>> inn.n_parameters() > 0
True
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iris_lab.methods.mmd import choose_alpha, mmd2_imq

#: Atmospheric quantities on the ``x`` side, in layout order.
QUANTITIES: tuple[str, ...] = ("n_e", "temperature", "v_los")
UNITS: dict[str, str] = {"n_e": "1 / cm3", "temperature": "K", "v_los": "cm / s"}
LINES: tuple[str, ...] = ("halpha", "ca8542")
#: Quality bits of :meth:`FlareINN.posterior_summary`.
FLAG_BITS: dict[str, int] = {"non_finite": 1, "saturated": 2, "no_signal": 4,
                             "high_residual": 8}
FORMAT = "iris_lab.FlareINN/1"
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "flare_inn.safetensors"
#: Synthetic CRISP-like field of view built with the shipped weights (notebook 07).
SHIPPED_FOV = SHIPPED.parent / "flare_fov.nc"


# ----------------------------------------------------------------------------- representation
def atmosphere_to_x(n_e: np.ndarray, temperature: np.ndarray, v_los: np.ndarray) -> np.ndarray:
    """The network's atmosphere representation ``[log n_e, log T, sign(v) log(|v|/1e5+1)]``.

    Parameters
    ----------
    n_e, temperature, v_los
        ``(..., n_height)`` in cm⁻³, K, cm s⁻¹ (positive = downflow).

    Returns
    -------
    np.ndarray
        ``(..., 3 * n_height)`` float32.

    Example
    -------
    >>> import numpy as np
    >>> x = atmosphere_to_x(np.full(2, 1e11), np.full(2, 1e4), np.array([-9e5, 0.0]))
    >>> np.round(x, 3).tolist()
    [11.0, 11.0, 4.0, 4.0, -1.0, 0.0]
    """
    n_e, temperature, v_los = (np.asarray(a, dtype=np.float64) for a in (n_e, temperature, v_los))
    if np.any(n_e <= 0) or np.any(temperature <= 0):
        raise ValueError("n_e and temperature must be positive to take their logarithm")
    v = np.sign(v_los) * np.log10(np.abs(v_los) / 1e5 + 1.0)
    return np.concatenate([np.log10(n_e), np.log10(temperature), v], axis=-1).astype(np.float32)


def x_to_atmosphere(x: np.ndarray | torch.Tensor, n_height: int) -> dict[str, np.ndarray]:
    """Invert :func:`atmosphere_to_x`: ``(..., 3 n)`` → dict of ``(..., n)`` CGS arrays.

    Float32, as the network's own output: on the CPU one pass of the fused C
    kernel of :mod:`iris_lab.methods.inn_fast` (≈ 0.3 ns per value, ~1e-6
    relative, the rounding of a float32 logarithm), else float32 torch
    operations. NaN stays NaN.

    Example
    -------
    >>> import numpy as np
    >>> out = x_to_atmosphere(np.array([11.0, 4.0, -1.0], dtype=np.float32), 1)
    >>> [float(f"{float(out[k][0]):.6g}") for k in ("n_e", "temperature", "v_los")]
    [100000000000.0, 10000.0, -900000.0]
    """
    x = torch.as_tensor(x).to(torch.float32)
    if x.shape[-1] != 3 * n_height:
        raise ValueError(f"expected 3 × {n_height} values on the last axis, got {x.shape[-1]}")
    batch = x.shape[:-1]
    rows = x.reshape(-1, 3 * n_height)
    lib = None
    if rows.device.type == "cpu":
        from iris_lab.methods.inn_fast import load_kernels

        lib = load_kernels()
    if lib is not None:
        rows = rows.contiguous()
        out = {k: torch.empty(rows.shape[0], n_height) for k in ("n_e", "temperature", "v_los")}
        lib.iris_x_to_cgs(rows.shape[0], n_height, rows.data_ptr(), rows.stride(0),
                          out["n_e"].data_ptr(), out["temperature"].data_ptr(),
                          out["v_los"].data_ptr(), torch.get_num_threads())
    else:
        le, lt, lv = (rows[:, i * n_height:(i + 1) * n_height] for i in range(3))
        out = {"n_e": torch.pow(10.0, le), "temperature": torch.pow(10.0, lt),
               "v_los": torch.pow(10.0, lv.abs()).sub_(1.0).mul_(torch.sign(lv) * 1e5)}
    return {k: v.reshape(*batch, n_height).cpu().numpy() for k, v in out.items()}


def normalise_profiles(halpha: np.ndarray, ca8542: np.ndarray) -> np.ndarray:
    """Concatenate Hα and Ca 8542 profiles, each divided by its own maximum.

    Example
    -------
    >>> import numpy as np
    >>> normalise_profiles(np.array([1.0, 2.0]), np.array([3.0, 6.0, 1.5])).tolist()
    [0.5, 1.0, 0.5, 1.0, 0.25]
    """
    ha = np.asarray(halpha, dtype=np.float64)
    ca = np.asarray(ca8542, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ha = ha / np.max(ha, axis=-1, keepdims=True)
        ca = ca / np.max(ca, axis=-1, keepdims=True)
    return np.concatenate([ha, ca], axis=-1).astype(np.float32)


def _subnet(n_layers: int, hidden: int, slope: float = 0.01):
    def build(dims_in: int, dims_out: int) -> nn.Module:
        sizes = [dims_in] + [hidden] * (n_layers - 1) + [dims_out]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.LeakyReLU(slope))
        # start close to the identity map, as Radynversion does
        nn.init.normal_(layers[-1].weight, std=1e-3)
        nn.init.zeros_(layers[-1].bias)
        return nn.Sequential(*layers)
    return build


@dataclasses.dataclass
class _Data:
    x: torch.Tensor
    y: torch.Tensor


class FlareINN:
    """Invertible network for flare atmospheres from Hα and Ca II 8542 profiles.

    Parameters
    ----------
    n_latent
        Size of the latent ``z`` (200 in the paper).
    width
        Common padded width of both sides (384 in the paper); must be even and
        at least ``max(3 n_height, n_y + n_latent)``.
    n_blocks
        Affine coupling blocks (5), with fixed random permutations between them.
    hidden, n_layers
        Hidden width (default ``width``) and number of linear layers (4) of
        each leaky-ReLU subnetwork.
    clamp
        Soft clamp (atan) of the log-scale of the affine couplings.
    lr, lr_final, weight_decay, batch_size, batches_per_epoch, max_epochs
        Adam learning rate, its final fraction after ``max_epochs`` of
        exponential decay, L2 regularisation, mini-batch size and count per epoch.
    w_pred, w_latent, w_rev
        Loss weights of the forward L2, latent MMD and backward MMD terms (the
        backward L2 has weight ``w_pred / 2``).
    pad_noise
        Scale of the noise put on the padding during fade-in (falls to zero).
    fade_in
        Fraction of ``max_epochs`` over which ξ(n) = (n / n_fade)³ rises to 1.
    alpha_every
        Epochs between re-choosing the IMQ kernel scales.
    patience
        Early stopping: epochs after fade-in without a better held-out loss.
    checkpoint, checkpoint_every
        File to write resumable checkpoints to (``None``: none) and how often.
    seed
        Seeds the permutations, initial weights, mini-batches and draws.
    device
        torch device ("cpu", "cuda", …).
    progress
        Show tqdm progress bars.

    Attributes
    ----------
    heights_, dl_halpha_, dl_ca8542_
        Training grids (cm, Å, Å).
    x_mean_, x_std_
        Per-dimension standardisation of ``x`` (``3 n_height`` each).
    net_
        The FrEIA ``SequenceINN``.
    history_
        Per-epoch training and held-out losses.

    Example
    -------
    >>> inn = FlareINN(width=256, hidden=16, n_latent=100, n_blocks=2)
    >>> inn.flops_per_draw() > 0
    True
    """

    def __init__(self, *, n_latent: int = 200, width: int = 384, n_blocks: int = 5,
                 hidden: int | None = None, n_layers: int = 4, clamp: float = 2.0,
                 lr: float = 1.5e-3, lr_final: float = 0.004, weight_decay: float = 2e-5,
                 batch_size: int = 500, batches_per_epoch: int = 20, max_epochs: int = 2000,
                 w_pred: float = 4000.0, w_latent: float = 900.0, w_rev: float = 1000.0,
                 pad_noise: float = 5e-2, fade_in: float = 0.4, alpha_every: int = 20,
                 patience: int = 200, checkpoint: str | Path | None = None,
                 checkpoint_every: int = 20, seed: int = 0, device: str = "cpu",
                 progress: bool = True) -> None:
        self.n_latent = n_latent
        self.width = width
        self.n_blocks = n_blocks
        self.hidden = hidden
        self.n_layers = n_layers
        self.clamp = clamp
        self.lr = lr
        self.lr_final = lr_final
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.max_epochs = max_epochs
        self.w_pred = w_pred
        self.w_latent = w_latent
        self.w_rev = w_rev
        self.pad_noise = pad_noise
        self.fade_in = fade_in
        self.alpha_every = alpha_every
        self.patience = patience
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.device = device
        self.progress = progress
        # grid sizes (set from data in fit, defaults from the flare-set schema)
        self.n_height_ = 50
        self.n_halpha_ = 29
        self.n_ca8542_ = 25
        self.net_: nn.Module | None = None
        #: Standard deviation of the latent draws (1: the training prior;
        #: :meth:`calibrate_latent_scale` fits it on held-out data).
        self.latent_scale_ = 1.0

    # ------------------------------------------------------------------ architecture
    _CONFIG_KEYS = ("n_latent", "width", "n_blocks", "hidden", "n_layers", "clamp", "lr",
                    "lr_final", "weight_decay", "batch_size", "batches_per_epoch",
                    "max_epochs", "w_pred", "w_latent", "w_rev", "pad_noise", "fade_in",
                    "alpha_every", "patience", "checkpoint_every", "seed")

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (without device, checkpoint, progress)."""
        return {k: getattr(self, k) for k in self._CONFIG_KEYS}

    @property
    def n_x(self) -> int:
        """Size of the atmosphere vector (3 × heights)."""
        return 3 * self.n_height_

    @property
    def n_y(self) -> int:
        """Size of the profile vector (Hα + Ca 8542 samples)."""
        return self.n_halpha_ + self.n_ca8542_

    def _check_dims(self) -> None:
        if self.width % 2:
            raise ValueError(f"width must be even, got {self.width}")
        if self.width < self.n_x or self.width < self.n_y + self.n_latent:
            raise ValueError(
                f"width {self.width} is smaller than the x side ({self.n_x}) or the "
                f"y + z side ({self.n_y} + {self.n_latent})")
        if self.n_layers < 2:
            raise ValueError("subnetworks need at least 2 layers")

    def _build(self) -> None:
        from FrEIA.framework import SequenceINN
        from FrEIA.modules import GLOWCouplingBlock, PermuteRandom

        self._check_dims()
        hidden = self.hidden or self.width
        # seeded initial weights without touching the global generators (FrEIA's
        # PermuteRandom reseeds numpy's global generator: its state is restored)
        np_state = np.random.get_state()  # noqa: NPY002
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                net = SequenceINN(self.width)
                for i in range(self.n_blocks):
                    net.append(GLOWCouplingBlock,
                               subnet_constructor=_subnet(self.n_layers, hidden),
                               clamp=self.clamp, clamp_activation="ATAN")
                    if i < self.n_blocks - 1:
                        net.append(PermuteRandom, seed=self.seed * 1000 + i)
        finally:
            np.random.set_state(np_state)  # noqa: NPY002
        self.net_ = net.to(self.device)

    def n_parameters(self) -> int:
        """Number of trainable weights."""
        if self.net_ is None:
            self._build()
        return sum(p.numel() for p in self.net_.parameters() if p.requires_grad)

    def flops_per_draw(self) -> int:
        """Matrix-multiply FLOPs of one pass (forward or backward) for one sample.

        Counts ``2 × in × out`` for every linear layer (each subnetwork runs once
        per pass); element-wise work (activations, clamp, exp) is not counted.
        """
        if self.net_ is None:
            self._build()
        return int(sum(2 * m.in_features * m.out_features for m in self.net_.modules()
                       if isinstance(m, nn.Linear)))

    # ------------------------------------------------------------------ data
    def _arrays_from_dataset(self, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        needed = ("temperature", "n_e", "v_los", "halpha", "ca8542")
        missing = [v for v in needed if v not in data]
        if missing:
            raise ValueError(f"flare set lacks variables {missing}")
        if "converged" in data:
            data = data.isel(sample=np.flatnonzero(np.asarray(data["converged"].values, bool)))
        x = atmosphere_to_x(data["n_e"].values, data["temperature"].values,
                            data["v_los"].values)
        y = normalise_profiles(data["halpha"].values, data["ca8542"].values)
        ok = np.isfinite(x).all(-1) & np.isfinite(y).all(-1)
        if not ok.any():
            raise ValueError("flare set has no finite samples")
        if "held_out" in data:
            held = np.asarray(data["held_out"].values, bool)
        else:
            rng = np.random.default_rng(self.seed)
            held = rng.random(x.shape[0]) < 0.2
        return x[ok], y[ok], held[ok]

    # ------------------------------------------------------------------ training
    def _xi(self, epoch: int) -> float:
        n_fade = max(self.fade_in * self.max_epochs, 1e-9)
        return min(epoch / n_fade, 1.0) ** 3

    def _losses(self, x: torch.Tensor, y: torch.Tensor, xi: float, noise: float,
                gen: torch.Generator) -> dict[str, torch.Tensor]:
        b, dev = x.shape[0], x.device
        nx, ny, nz, w = self.n_x, self.n_y, self.n_latent, self.width

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=dev)

        xp = torch.cat([x, noise * randn(b, w - nx)], 1)
        out, _ = self.net_(xp, jac=False)
        y_out, z_out, pad_out = out[:, :ny], out[:, ny:ny + nz], out[:, ny + nz:]
        l_fit = ((y_out - y) ** 2).mean()
        if w > ny + nz:
            pad_t = noise * randn(b, w - ny - nz)
            l_fit = l_fit + ((pad_out - pad_t) ** 2).mean()
        l_lat = mmd2_imq(torch.cat([y_out.detach(), z_out], 1),
                         torch.cat([y, randn(b, nz)], 1), self.alpha_latent_)
        pad_y = noise * randn(b, w - ny - nz)
        x_rev, _ = self.net_(torch.cat([y, z_out.detach(), pad_y], 1), rev=True, jac=False)
        l_rev = ((x_rev - xp) ** 2).mean()
        x_rand, _ = self.net_(torch.cat([y, randn(b, nz), pad_y], 1), rev=True, jac=False)
        l_mmd = mmd2_imq(x_rand[:, :nx], x, self.alpha_rev_)
        total = (self.w_pred * l_fit + self.w_latent * l_lat + 0.5 * self.w_pred * l_rev
                 + self.w_rev * xi * l_mmd)
        return {"total": total, "fit": l_fit, "latent": l_lat, "rev_l2": l_rev,
                "rev_mmd": l_mmd, "y_out": y_out, "z_out": z_out, "x_rand": x_rand[:, :nx]}

    def _rechoose_alphas(self, data: _Data, gen: torch.Generator) -> None:
        n = min(len(data.x), self.batch_size)
        idx = torch.randperm(len(data.x), generator=gen, device=data.x.device)[:n]
        x, y = data.x[idx], data.y[idx]
        with torch.no_grad():
            lo = self._losses(x, y, 1.0, 0.0, gen)
            z = torch.randn(n, self.n_latent, generator=gen, device=x.device)
            self.alpha_latent_, _ = choose_alpha(torch.cat([lo["y_out"], lo["z_out"]], 1),
                                                 torch.cat([y, z], 1))
            self.alpha_rev_, _ = choose_alpha(lo["x_rand"], x)

    def _validate(self, data: _Data, gen: torch.Generator) -> dict[str, float]:
        self.net_.eval()
        with torch.no_grad():
            lo = self._losses(data.x, data.y, 1.0, 0.0, gen)
        self.net_.train()
        return {k: float(v) for k, v in lo.items() if v.ndim == 0}

    def _state(self, epoch, opt, sched, gen, best_state, best_val, best_epoch,
               done) -> dict:
        return {"epoch": epoch, "done": done, "net": self.net_.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(), "gen": gen.get_state(),
                "alpha_latent": self.alpha_latent_, "alpha_rev": self.alpha_rev_,
                "best_state": best_state, "best_val": best_val, "best_epoch": best_epoch,
                "history": self.history_, "x_mean": self.x_mean_, "x_std": self.x_std_}

    def fit(self, data, *, resume: bool = True, epochs: int | None = None) -> FlareINN:
        """Train on a flare set (``iris_lab/data/flare_set.nc`` schema).

        Parameters
        ----------
        data
            ``xarray.Dataset`` with ``temperature``, ``n_e``, ``v_los``
            (sample, height), ``halpha`` (sample, dl_halpha), ``ca8542``
            (sample, dl_ca8542) and optionally ``held_out`` and ``converged``
            (sample). Without ``held_out`` a seeded 20 % is held out.
        resume
            Continue from ``checkpoint`` when that file exists.
        epochs
            Train at most this many epochs in this call (a checkpoint is
            written when it stops); call ``fit`` again to continue. ``None``:
            until ``max_epochs`` or early stopping.

        Returns
        -------
        FlareINN
            ``self``, trained; the weights of the best held-out epoch are kept.

        Example
        -------
        ``FlareINN(max_epochs=300).fit(xarray.open_dataset("flare_set.nc"))``
        """
        from tqdm.auto import tqdm

        x_np, y_np, held = self._arrays_from_dataset(data)
        self.n_height_ = int(data.sizes["height"])
        self.n_halpha_ = int(data["halpha"].shape[-1])
        self.n_ca8542_ = int(data["ca8542"].shape[-1])
        self.heights_ = np.asarray(data["height"].values, dtype=np.float64)
        self.dl_halpha_ = np.asarray(data[data["halpha"].dims[-1]].values, dtype=np.float64)
        self.dl_ca8542_ = np.asarray(data[data["ca8542"].dims[-1]].values, dtype=np.float64)
        if held.all() or not held.any():
            raise ValueError("flare set needs both training and held-out samples")
        # per-dimension standardisation (a per-quantity one hides the sample-to-sample
        # variation under the height stratification); floor for near-constant heights
        # floor: 5 % of the quantity's spread over all heights (and 0.01), so that a
        # height almost constant in the training set does not blow up unseen values
        xt = x_np[~held].astype(np.float64)
        floor = np.repeat(0.05 * xt.reshape(len(xt), 3, -1).std(axis=(0, 2)), self.n_height_)
        self.x_mean_ = torch.tensor(xt.mean(0), dtype=torch.float32)
        self.x_std_ = torch.tensor(np.maximum(xt.std(0), np.maximum(floor, 1e-2)),
                                   dtype=torch.float32)
        self._build()
        dev = self.device
        train = _Data(self._scale(torch.from_numpy(x_np[~held])).to(dev),
                      torch.from_numpy(y_np[~held]).to(dev))
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        # a fixed, bounded validation subset (MMD is quadratic in its size)
        vidx = np.flatnonzero(held)[:2000]
        val = _Data(self._scale(torch.from_numpy(x_np[vidx])).to(dev),
                    torch.from_numpy(y_np[vidx]).to(dev))

        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, betas=(0.8, 0.8), eps=1e-6,
                               weight_decay=self.weight_decay)
        gamma = self.lr_final ** (1.0 / max(self.max_epochs, 1))
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        self.history_ = {k: [] for k in ("epoch", "train", "val", "val_fit", "val_rev_mmd",
                                         "alpha_latent", "alpha_rev", "seconds")}
        self.alpha_latent_, self.alpha_rev_ = 2.0, 2.0
        start, best_state, best_val, best_epoch = 0, None, math.inf, -1
        ckpt = Path(self.checkpoint) if self.checkpoint else None
        if resume and ckpt is not None and ckpt.exists():
            try:
                st = torch.load(ckpt, weights_only=True, map_location=dev)
                self.net_.load_state_dict(st["net"])
                opt.load_state_dict(st["opt"])
                sched.load_state_dict(st["sched"])
                gen.set_state(st["gen"])
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise ValueError(f"checkpoint {ckpt} is corrupt or from another "
                                 f"configuration: {err}") from err
            self.alpha_latent_, self.alpha_rev_ = st["alpha_latent"], st["alpha_rev"]
            best_state, best_val, best_epoch = st["best_state"], st["best_val"], st["best_epoch"]
            self.history_ = st["history"]
            start = self.max_epochs if st.get("done") else int(st["epoch"]) + 1
        else:
            self._rechoose_alphas(val, gen)

        n_train = len(train.x)
        bs = min(self.batch_size, n_train)
        fade_end = int(math.ceil(self.fade_in * self.max_epochs))
        end = self.max_epochs if epochs is None else min(self.max_epochs, start + epochs)
        self.finished_ = end == self.max_epochs
        bar = tqdm(range(start, end), initial=start, total=self.max_epochs,
                   desc="FlareINN", disable=not self.progress)
        self.net_.train()
        t0 = time.perf_counter()
        for epoch in bar:
            xi = self._xi(epoch)
            noise = (1.0 - xi) * self.pad_noise
            if epoch > start and epoch % self.alpha_every == 0:
                self._rechoose_alphas(val, gen)
            tot = 0.0
            for _ in range(self.batches_per_epoch):
                idx = torch.randint(0, n_train, (bs,), generator=gen, device=dev)
                opt.zero_grad(set_to_none=True)
                lo = self._losses(train.x[idx], train.y[idx], xi, noise, gen)
                lo["total"].backward()
                for p in self.net_.parameters():
                    if p.grad is not None:
                        p.grad.clamp_(-15.0, 15.0)
                opt.step()
                tot += lo["total"].item()
            sched.step()
            v = self._validate(val, gen)
            h = self.history_
            for k, val_k in (("epoch", epoch), ("train", tot / self.batches_per_epoch),
                             ("val", v["total"]), ("val_fit", v["fit"]),
                             ("val_rev_mmd", v["rev_mmd"]), ("alpha_latent", self.alpha_latent_),
                             ("alpha_rev", self.alpha_rev_),
                             ("seconds", time.perf_counter() - t0)):
                h[k].append(float(val_k))
            if epoch >= fade_end - 1 and v["total"] < best_val:
                best_val, best_epoch = v["total"], epoch
                best_state = copy.deepcopy(self.net_.state_dict())
            bar.set_postfix(val=f"{v['total']:.3g}", fit=f"{v['fit']:.2e}")
            last = epoch == end - 1
            stop = best_epoch >= 0 and epoch - best_epoch > self.patience
            if ckpt is not None and (epoch % self.checkpoint_every == 0 or last or stop):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_suffix(ckpt.suffix + ".tmp")
                done = stop or epoch == self.max_epochs - 1
                torch.save(self._state(epoch, opt, sched, gen, best_state, best_val,
                                       best_epoch, done), tmp)
                tmp.replace(ckpt)
            if stop:
                self.finished_ = True
                break
        bar.close()
        if best_state is not None:
            self.net_.load_state_dict(best_state)
        self.net_.eval()
        self.best_epoch_, self.best_val_loss_ = best_epoch, best_val
        self.n_epochs_ = len(self.history_["epoch"])
        return self

    # ------------------------------------------------------------------ scaling
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean_.to(x.device)) / self.x_std_.to(x.device)

    def _unscale(self, xs: torch.Tensor) -> torch.Tensor:
        return xs * self.x_std_.to(xs.device) + self.x_mean_.to(xs.device)

    def _require_fitted(self) -> None:
        if self.net_ is None or not hasattr(self, "x_mean_"):
            raise RuntimeError("FlareINN is not fitted: call fit() or FlareINN.load()")

    # ------------------------------------------------------------------ inference
    def _as_y(self, profiles) -> np.ndarray:
        if isinstance(profiles, Mapping):
            y = normalise_profiles(profiles["halpha"], profiles["ca8542"])
        elif isinstance(profiles, tuple):
            y = normalise_profiles(*profiles)
        else:
            p = np.asarray(profiles, dtype=np.float32)
            if p.shape[-1] != self.n_y:
                raise ValueError(f"profiles must have {self.n_y} samples (Hα {self.n_halpha_} + "
                                 f"Ca 8542 {self.n_ca8542_}) on the last axis, got {p.shape}")
            y = normalise_profiles(p[..., :self.n_halpha_], p[..., self.n_halpha_:])
        if y.shape[-1] != self.n_y:
            raise ValueError(f"profiles give {y.shape[-1]} samples, the network expects {self.n_y}")
        return y

    def _evaluator(self, fast: bool):
        """The inference-only :class:`~iris_lab.methods.inn_fast.FrozenINN` of ``net_``
        (fused kernels on the CPU) when ``fast``; ``None``: use the FrEIA module."""
        if fast:
            from iris_lab.methods.inn_fast import FrozenINN

            return FrozenINN.from_sequence(self.net_)
        return None

    def _run_net(self, frozen, inp: torch.Tensor, rev: bool) -> torch.Tensor:
        """One pass over ``(n, width)`` rows; overwrites ``inp`` on the fast path."""
        if frozen is not None:
            return frozen.reverse(inp, out=inp) if rev else frozen.forward(inp, out=inp)
        out, _ = self.net_(inp, rev=rev, jac=False)
        return out

    def sample_x(self, y: torch.Tensor, n_draws: int, *, generator: torch.Generator,
                 max_rows: int = 65536, fast: bool = True) -> torch.Tensor:
        """Posterior draws in the network representation.

        Parameters
        ----------
        y
            ``(n_pixels, n_y)`` normalised profiles (tensor on any device).
        n_draws
            Draws per pixel.
        generator
            torch generator on the network's device.
        max_rows
            Rows (pixels × draws) whose latent vectors are drawn together; the
            draws do not depend on the path but do depend on this grouping.
        fast
            Evaluate with :class:`~iris_lab.methods.inn_fast.FrozenINN` in
            cache-sized chunks (default); ``False``: the FrEIA module (same
            result to float32 rounding).

        Returns
        -------
        torch.Tensor
            ``(n_pixels, n_draws, 3 n_height)`` unscaled representation
            (log n_e, log T, signed log v).

        Example
        -------
        >>> import torch
        >>> inn = FlareINN(width=96, hidden=16, n_latent=30, n_blocks=2, progress=False)
        >>> inn.n_height_, inn.n_halpha_, inn.n_ca8542_ = 10, 5, 5
        >>> inn.x_mean_, inn.x_std_ = torch.zeros(30), torch.ones(30)
        >>> inn._build()
        >>> g = torch.Generator().manual_seed(0)
        >>> inn.sample_x(torch.rand(2, 10), 7, generator=g).shape
        torch.Size([2, 7, 30])
        """
        self._require_fitted()
        dev = self.device
        y = y.to(dev, torch.float32)
        n_pix, ny, nz, nx = y.shape[0], self.n_y, self.n_latent, self.n_x
        out = torch.empty(n_pix, n_draws, nx, device=dev)
        flat = out.view(n_pix * n_draws, nx)
        pix_per = max(1, max_rows // max(n_draws, 1))
        frozen = self._evaluator(fast)
        chunk = frozen.batch_rows if frozen is not None else max_rows
        mean, std = self.x_mean_.to(dev), self.x_std_.to(dev)
        driver = frozen is not None and frozen.uses_driver  # builds its own input rows
        inp = None if driver else torch.empty(min(chunk, pix_per * n_draws), self.width,
                                              device=dev)
        # one latent buffer refilled in place (the same numbers as torch.randn per group,
        # without paging in a fresh ~50 MB array for every group)
        z_buf = torch.empty(min(n_pix, pix_per) * n_draws * nz, device=dev)
        with torch.inference_mode():
            for s in range(0, n_pix, pix_per):
                yy = y[s:s + pix_per]
                rows = yy.shape[0] * n_draws
                z = z_buf[:rows * nz].view(rows, nz).normal_(generator=generator)
                if driver:
                    # one call: input rows built, network run and output unscaled in C
                    frozen.reverse_latent(yy, z, n_draws, scale=self.latent_scale_, mean=mean,
                                          std=std, out=flat[s * n_draws:s * n_draws + rows])
                    continue
                for r0 in range(0, rows, chunk):
                    n = min(chunk, rows - r0)
                    buf = inp[:n]
                    pix = torch.arange(r0, r0 + n, device=dev) // n_draws
                    buf[:, :ny] = yy[pix]
                    torch.mul(z[r0:r0 + n], self.latent_scale_, out=buf[:, ny:ny + nz])
                    buf[:, ny + nz:] = 0.0
                    xr = self._run_net(frozen, buf, rev=True)
                    dst = flat[s * n_draws + r0:s * n_draws + r0 + n]
                    torch.addcmul(mean, xr[:, :nx], std, out=dst)
        return out

    def coverage(self, data, *, n_draws: int = 200, level: float = 0.68,
                 seed: int = 0) -> float:
        """Fraction of true values inside the central ``level`` posterior interval.

        Averaged over the samples of ``data`` (a flare-set-like dataset with
        the true atmospheres and their profiles), all heights and the three
        quantities; a calibrated posterior gives ``level``.
        """
        self._require_fitted()
        x, y, _ = self._arrays_from_dataset(data)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        draws = self.sample_x(torch.as_tensor(y), n_draws, generator=gen).cpu().numpy()
        tail = 50.0 * (1.0 - level)
        lo, hi = np.percentile(draws, [tail, 100.0 - tail], axis=1)
        return float(np.mean((x >= lo) & (x <= hi)))

    def calibrate_latent_scale(self, data, *, scales: Sequence[float] = (
            1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0), n_draws: int = 200, level: float = 0.68,
            seed: int = 0) -> dict[float, float]:
        """Choose the latent standard deviation whose posteriors are calibrated.

        A network trained on a finite set tends to give posteriors that are too
        narrow; drawing ``z ~ N(0, s² I)`` with ``s > 1`` widens them. For each
        ``s`` in ``scales`` the coverage of the central ``level`` interval is
        measured on ``data`` (use samples that were neither trained on nor used
        for the reported validation), and ``latent_scale_`` is set to the ``s``
        whose coverage is closest to ``level`` (within 0.01 of the closest, the
        one nearest 1: no widening the data do not ask for), among the scales up
        to the one of the highest coverage (beyond it the draws leave the
        training distribution and a falling coverage means nothing).

        Returns
        -------
        dict
            ``{scale: coverage}``; also stored as ``latent_calibration_``.

        Example
        -------
        ``inn.calibrate_latent_scale(flare_set.isel(sample=calibration_samples))``
        """
        table = {}
        for scale in scales:
            if not scale > 0:
                raise ValueError(f"latent scales must be positive, not {scale}")
            self.latent_scale_ = float(scale)
            table[float(scale)] = self.coverage(data, n_draws=n_draws, level=level, seed=seed)
        # only the rising branch: past the scale of the highest coverage, wider latent
        # draws leave the training distribution and the coverage falls for that reason
        peak = max(table, key=lambda k: (table[k], -k))
        rising = {k: c for k, c in table.items() if k <= peak}
        # the scale nearest ``level``; within 0.01 of that, the one nearest 1
        smallest = min(abs(c - level) for c in rising.values())
        near = [k for k, c in rising.items() if abs(c - level) <= smallest + 0.01]
        self.latent_scale_ = min(near, key=lambda k: abs(math.log(k)))
        self.latent_calibration_ = {"level": level, "coverage": {str(k): v for k, v in
                                                                 table.items()}}
        return table

    def sample(self, profiles, n_draws: int = 1000, *, seed: int | None = None,
               max_rows: int = 65536) -> dict[str, np.ndarray]:
        """Draw atmospheres from the posterior of every given pixel.

        Parameters
        ----------
        profiles
            ``(..., n_y)`` array (Hα then Ca 8542 on the training grids), or a
            ``(halpha, ca8542)`` tuple / ``{"halpha", "ca8542"}`` mapping;
            each line is divided by its own maximum here.
        n_draws
            Posterior draws per pixel.
        seed
            Seed of the latent draws (default: the estimator's ``seed``).

        Returns
        -------
        dict
            ``n_e`` [cm⁻³], ``temperature`` [K], ``v_los`` [cm s⁻¹] float32 arrays of
            shape ``(..., n_draws, n_height)``.

        Example
        -------
        ``draws = FlareINN.load_shipped().sample(obs, 20000)``
        """
        y = self._as_y(profiles)
        batch = y.shape[:-1]
        if not np.isfinite(y).all():
            raise ValueError("profiles contain non-finite values or a line with zero maximum; "
                             "use posterior_summary for maps with bad pixels")
        gen = torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)
        xr = self.sample_x(torch.from_numpy(y.reshape(-1, self.n_y)), n_draws, generator=gen,
                           max_rows=max_rows)
        atm = x_to_atmosphere(xr, self.n_height_)
        return {k: v.reshape(*batch, n_draws, self.n_height_) for k, v in atm.items()}

    def predict_profiles(self, n_e: np.ndarray, temperature: np.ndarray,
                         v_los: np.ndarray) -> np.ndarray:
        """Forward pass: normalised ``(..., n_y)`` profiles of given atmospheres.

        Example
        -------
        ``y = inn.predict_profiles(ds.n_e.values, ds.temperature.values, ds.v_los.values)``
        """
        self._require_fitted()
        x = torch.from_numpy(atmosphere_to_x(n_e, temperature, v_los))
        batch = x.shape[:-1]
        return self._forward_y(self._scale(x.reshape(-1, self.n_x))).cpu().numpy().reshape(
            *batch, self.n_y)

    def _forward_y(self, xs: torch.Tensor, max_rows: int = 65536, *,
                   fast: bool = True) -> torch.Tensor:
        """Normalised profiles ``(n, n_y)`` of scaled atmospheres ``(n, n_x)``."""
        dev = self.device
        out = torch.empty(xs.shape[0], self.n_y, device=dev)
        frozen = self._evaluator(fast)
        chunk = frozen.batch_rows if frozen is not None else max_rows
        inp = torch.empty(min(chunk, max(xs.shape[0], 1)), self.width, device=dev)
        with torch.inference_mode():
            for s in range(0, xs.shape[0], chunk):
                n = min(chunk, xs.shape[0] - s)
                buf = inp[:n]
                buf[:, :self.n_x] = xs[s:s + n]
                buf[:, self.n_x:] = 0.0
                out[s:s + n] = self._run_net(frozen, buf, rev=False)[:, :self.n_y]
        return out

    def round_trip(self, profiles, n_draws: int = 100, *,
                   seed: int | None = None) -> np.ndarray:
        """Posterior draws pushed forward again: ``(..., n_draws, n_y)`` profiles.

        Compare with the normalised observation to judge whether the posterior
        explains the data (Osborne et al. 2019, Fig. 9).
        """
        y = self._as_y(profiles)
        batch = y.shape[:-1]
        gen = torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)
        xr = self.sample_x(torch.from_numpy(y.reshape(-1, self.n_y)), n_draws, generator=gen)
        yo = self._forward_y(self._scale(xr.reshape(-1, self.n_x)))
        return yo.cpu().numpy().reshape(*batch, n_draws, self.n_y)

    def profiles_to_grid(self, cube) -> tuple[np.ndarray, np.ndarray]:
        """Interpolate observed Hα / Ca 8542 profiles onto the training grids.

        Parameters
        ----------
        cube
            ``xarray.Dataset`` with ``halpha`` and ``ca8542`` whose last
            dimension is a coordinate of offsets from line centre [Å] (e.g. the
            CRISP positions of :func:`iris_lab.instrument.crisp_positions`).

        Returns
        -------
        halpha, ca8542
            ``(*spatial, n_halpha)`` and ``(*spatial, n_ca8542)`` arrays.

        Raises
        ------
        ValueError
            If a line's positions do not cover its training grid (a gap larger
            than one training step at either end) or are not sorted.
        """
        from scipy.interpolate import interp1d

        self._require_fitted()
        out = []
        for line, grid in (("halpha", self.dl_halpha_), ("ca8542", self.dl_ca8542_)):
            if line not in cube:
                raise ValueError(f"cube lacks the {line!r} variable")
            da = cube[line]
            pos = np.asarray(da[da.dims[-1]].values, dtype=np.float64)
            if pos.ndim != 1 or pos.size < 2 or np.any(np.diff(pos) <= 0):
                raise ValueError(f"{line}: wavelength positions must increase along "
                                 f"{da.dims[-1]!r}")
            step = float(np.min(np.diff(grid)))
            if pos[0] > grid[0] + 0.5 * step or pos[-1] < grid[-1] - 0.5 * step:
                raise ValueError(
                    f"{line}: observed positions {pos[0]:+.3f}..{pos[-1]:+.3f} Å do not cover "
                    f"the training grid {grid[0]:+.3f}..{grid[-1]:+.3f} Å")
            gaps = np.diff(pos[(pos >= grid[0] - step) & (pos <= grid[-1] + step)])
            if gaps.size and gaps.max() > 4.0 * step + 1e-9:
                raise ValueError(f"{line}: sampling gap of {gaps.max():.3f} Å inside the "
                                 f"training range is too coarse (> 4 grid steps)")
            f = interp1d(pos, np.asarray(da.values, dtype=np.float64), axis=-1,
                         bounds_error=False, fill_value=(da.values[..., 0], da.values[..., -1]))
            out.append(f(np.clip(grid, pos[0], pos[-1])))
        return out[0], out[1]

    def posterior_summary(self, cube, n_draws: int = 200, *, saturation: float | None = None,
                          n_round_trip: int = 16, residual_threshold: float = 0.25,
                          seed: int | None = None, max_rows: int = 65536, fast: bool = True):
        """Posterior median and 16/84 % percentiles of n_e, T, v for every pixel.

        Parameters
        ----------
        cube
            ``xarray.Dataset`` with ``halpha`` (…, dl) and ``ca8542`` (…, dl)
            on the same leading (spatial) dims, usually ``(y, x)``; offsets [Å].
        n_draws
            Posterior draws per pixel.
        saturation
            Samples at or above this level flag their pixel as saturated.
        n_round_trip
            Draws per pixel pushed forward again for the round-trip residual.
        residual_threshold
            Round-trip residual (normalised intensity) above which a pixel is
            flagged. The default, 0.25, lies above the shipped network's held-out
            pixels (median 0.15, 95th percentile 0.22) and flags 3 % of notebook
            07's map.
        seed, max_rows
            Seed of the latent draws; rows (pixels × draws) drawn together.
        fast
            Inference-only evaluator and sorting-network percentiles (default);
            ``False``: the FrEIA module and ``torch.quantile`` (same result to
            float32 rounding).

        Returns
        -------
        xarray.Dataset
            Dims (spatial…, ``height``): ``n_e``, ``temperature``, ``v_los``
            (posterior medians) and ``*_p16``, ``*_p84``; ``round_trip_rms``
            and ``quality`` (bits ``non_finite saturated no_signal
            high_residual``) per pixel. Flagged pixels (except high_residual)
            are not inverted and hold NaN.

        Example
        -------
        ``summary = inn.posterior_summary(cube, n_draws=200)``
        """
        import xarray as xr
        from tqdm.auto import tqdm

        from iris_lab.methods.inn_fast import draw_percentiles

        self._require_fitted()
        ha, ca = self.profiles_to_grid(cube)
        spatial = cube["halpha"].dims[:-1]
        shape = ha.shape[:-1]
        ha2, ca2 = ha.reshape(-1, ha.shape[-1]), ca.reshape(-1, ca.shape[-1])
        n_pix = ha2.shape[0]
        quality = np.zeros(n_pix, np.uint8)
        raw_ha = np.asarray(cube["halpha"].values).reshape(n_pix, -1)
        raw_ca = np.asarray(cube["ca8542"].values).reshape(n_pix, -1)
        bad = ~(np.isfinite(raw_ha).all(-1) & np.isfinite(raw_ca).all(-1))
        quality[bad] |= FLAG_BITS["non_finite"]
        if saturation is not None:
            with np.errstate(invalid="ignore"):
                sat = (raw_ha >= saturation).any(-1) | (raw_ca >= saturation).any(-1)
            quality[sat] |= FLAG_BITS["saturated"]
        with np.errstate(invalid="ignore"):
            nosig = ~((np.nanmax(np.where(np.isfinite(ha2), ha2, -np.inf), -1) > 0)
                      & (np.nanmax(np.where(np.isfinite(ca2), ca2, -np.inf), -1) > 0))
        quality[nosig & ~bad] |= FLAG_BITS["no_signal"]
        good = np.flatnonzero(quality == 0)
        nh = self.n_height_
        q_levels = torch.tensor([0.16, 0.5, 0.84], device=self.device)
        stats = np.full((3, n_pix, 3 * nh), np.nan, np.float32)
        rms = np.full(n_pix, np.nan, np.float32)
        gen = torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)
        pix_per = max(1, max_rows // n_draws)
        y_good = normalise_profiles(ha2[good], ca2[good])
        lib = None
        if fast and self.device == "cpu":
            from iris_lab.methods.inn_fast import load_kernels

            lib = load_kernels()
        with torch.inference_mode():
            for s in tqdm(range(0, good.size, pix_per), desc="posterior",
                          disable=not self.progress):
                yy = torch.from_numpy(y_good[s:s + pix_per]).to(self.device)
                xr_ = self.sample_x(yy, n_draws, generator=gen, max_rows=max_rows, fast=fast)
                k = min(n_round_trip, n_draws)
                if k > 0:  # before the percentiles, which sort the draws in place
                    sub = self._scale(xr_[:, :k].reshape(-1, self.n_x))
                    yo = self._forward_y(sub, max_rows, fast=fast).reshape(yy.shape[0], k, -1)
                    # median over the draws of each draw's RMS: a few draws far outside
                    # the training distribution (pushed forward, they can give values
                    # of 100s) do not decide the pixel's quality
                    r = ((yo - yy[:, None, :]) ** 2).mean(2).sqrt().median(1).values
                    rms[good[s:s + pix_per]] = r.cpu().numpy()
                if fast:
                    st = draw_percentiles(xr_, q_levels, lib=lib)
                else:
                    st = torch.quantile(xr_, q_levels, dim=1)
                stats[:, good[s:s + pix_per]] = st.cpu().numpy()
        with np.errstate(invalid="ignore"):
            quality[rms > residual_threshold] |= FLAG_BITS["high_residual"]
        dims = (*spatial, "height")
        data_vars = {}
        for j, (name, level) in enumerate((("_p16", 0), ("", 1), ("_p84", 2))):
            atm = x_to_atmosphere(stats[level], nh)
            for q in QUANTITIES:
                data_vars[q + name] = xr.DataArray(
                    atm[q].reshape(*shape, nh).astype(np.float32), dims=dims,
                    attrs={"units": UNITS[q], "long_name": f"{q} posterior "
                           + ("median" if j == 1 else f"{name[2:]}th percentile")})
        data_vars["round_trip_rms"] = xr.DataArray(
            rms.reshape(shape), dims=spatial,
            attrs={"units": "", "long_name": "median over the round-trip draws of the RMS of "
                   "a posterior draw pushed forward minus the observed normalised profiles"})
        data_vars["quality"] = xr.DataArray(
            quality.reshape(shape), dims=spatial,
            attrs={"flag_masks": np.array(list(FLAG_BITS.values()), np.uint8),
                   "flag_meanings": " ".join(FLAG_BITS)})
        coords = {"height": ("height", self.heights_, {"units": "cm"})}
        for d in spatial:
            if d in cube.coords:
                coords[d] = cube[d].values
        return xr.Dataset(data_vars, coords=coords,
                          attrs={"method": "flare_inn", "n_draws": n_draws,
                                 "n_round_trip": n_round_trip})

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, provenance: Mapping[str, Any] | None = None) -> Path:
        """Write weights and configuration to a safetensors file.

        Example
        -------
        ``inn.save("flare_inn.safetensors")``
        """
        from safetensors.torch import save_file

        self._require_fitted()
        tensors = {f"net.{k}": v.detach().cpu().contiguous()
                   for k, v in self.net_.state_dict().items()}
        tensors.update({
            "x_mean_": self.x_mean_.cpu(), "x_std_": self.x_std_.cpu(),
            "heights_": torch.tensor(np.asarray(self.heights_, np.float64)),
            "dl_halpha_": torch.tensor(np.asarray(self.dl_halpha_, np.float64)),
            "dl_ca8542_": torch.tensor(np.asarray(self.dl_ca8542_, np.float64))})
        meta = {"format": FORMAT, "config": json.dumps(self.get_params()),
                "grids": json.dumps({"n_height": self.n_height_, "n_halpha": self.n_halpha_,
                                     "n_ca8542": self.n_ca8542_}),
                "provenance": json.dumps(dict(provenance or {}), default=str)}
        for k in ("best_epoch_", "best_val_loss_", "n_epochs_", "latent_scale_",
                  "latent_calibration_"):
            if hasattr(self, k):
                meta[k] = json.dumps(getattr(self, k))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", progress: bool = False) -> FlareINN:
        """Read a network written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ValueError
            If it is not a FlareINN safetensors file, is truncated/corrupt, or
            its tensors do not match its configuration.

        Example
        -------
        ``inn = FlareINN.load("flare_inn.safetensors")``
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no FlareINN weights at {path}")
        try:
            tensors = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
            raise ValueError(f"{path} is not a readable safetensors file (corrupt or "
                             f"truncated?): {err}") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a FlareINN weights file (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        try:
            inn = cls(**json.loads(meta["config"]), device=device, progress=progress)
            grids = json.loads(meta["grids"])
            inn.n_height_, inn.n_halpha_, inn.n_ca8542_ = (
                grids["n_height"], grids["n_halpha"], grids["n_ca8542"])
            inn._build()
            state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
            inn.net_.load_state_dict(state, strict=True)
        except (KeyError, TypeError, RuntimeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: weights do not match the stored configuration: "
                             f"{err}") from err
        inn.net_.to(device).eval()
        inn.x_mean_, inn.x_std_ = tensors["x_mean_"], tensors["x_std_"]
        inn.heights_ = tensors["heights_"].numpy()
        inn.dl_halpha_ = tensors["dl_halpha_"].numpy()
        inn.dl_ca8542_ = tensors["dl_ca8542_"].numpy()
        inn.provenance_ = json.loads(meta.get("provenance", "{}"))
        for k in ("best_epoch_", "best_val_loss_", "n_epochs_", "latent_scale_",
                  "latent_calibration_"):
            if k in meta:
                setattr(inn, k, json.loads(meta[k]))
        if not (isinstance(inn.latent_scale_, float | int) and 0 < inn.latent_scale_ < 100):
            raise ValueError(f"{path}: invalid latent_scale_ {inn.latent_scale_!r}")
        return inn

    @classmethod
    def load_shipped(cls, *, device: str = "cpu") -> FlareINN:
        """The network trained on the shipped flare set (``data/flare_inn.safetensors``)."""
        return cls.load(SHIPPED, device=device)


def held_out_halves(data) -> tuple[np.ndarray, np.ndarray]:
    """Split the held-out samples of a flare set into two halves by sequence.

    The first half (every other held-out sequence, in sequence order) is for
    choosing settings such as :meth:`FlareINN.calibrate_latent_scale`; the
    second for the reported validation, so the two never share a sequence.
    Without a ``sequence`` variable the held-out samples alternate.

    Returns
    -------
    tuple of numpy.ndarray
        Boolean masks over ``sample``: (calibration, evaluation).

    Example
    -------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"held_out": ("sample", [True, True, False, True]),
    ...                  "sequence": ("sample", [0, 0, 1, 2])})
    >>> [m.tolist() for m in held_out_halves(ds)]
    [[True, True, False, False], [False, False, False, True]]
    """
    held = np.asarray(data["held_out"].values, bool)
    if "converged" in data:
        held &= np.asarray(data["converged"].values, bool)
    if "sequence" in data:
        seq = np.asarray(data["sequence"].values)
        first = np.unique(seq[held])[::2]
        calibration = held & np.isin(seq, first)
    else:
        calibration = np.zeros_like(held)
        calibration[np.flatnonzero(held)[::2]] = True
    return calibration, held & ~calibration


def synthetic_flare_map(flare_set, shape: tuple[int, int] = (24, 32), *, seed: int = 0,
                        noise: float = 0.01, ribbon_width: float = 2.5):
    """A CRISP-like flare field of view built from held-out flare-set samples.

    A sinuous ribbon crosses the field: its pixels take held-out samples from
    the heated steps of the flare sequences (``step > 0``), the other pixels
    pre-flare samples (``step == 0``; the first step of each sequence when the
    set has no ``step`` variable). Hα is sampled at the 15 CRISP positions
    (200 mÅ) and Ca II 8542 at the 25 (100 mÅ) by linear interpolation of the
    set's grids, and Gaussian noise of ``noise`` times each pixel's line
    maximum is added.

    Parameters
    ----------
    flare_set
        Dataset in the ``flare_set.nc`` schema.
    shape
        ``(ny, nx)`` of the map.
    seed, noise, ribbon_width
        Random seed, relative noise, ribbon half-width [pixels].

    Returns
    -------
    cube, truth
        ``cube``: ``halpha`` (y, x, dl_halpha) and ``ca8542`` (y, x, dl_ca8542)
        at the CRISP positions [Å]; ``truth``: ``n_e``, ``temperature``,
        ``v_los`` (y, x, height), ``ribbon`` (y, x) and ``sample`` (y, x).

    Example
    -------
    ``cube, truth = synthetic_flare_map(xr.open_dataset("flare_set.nc"), (24, 32))``
    """
    import xarray as xr

    from iris_lab.instrument import crisp_positions

    rng = np.random.default_rng(seed)
    ny, nx = shape
    ok = np.ones(flare_set.sizes["sample"], bool)
    if "converged" in flare_set:
        ok &= flare_set["converged"].values.astype(bool)
    held = ok & flare_set["held_out"].values.astype(bool) if "held_out" in flare_set else ok
    step = (flare_set["step"].values if "step" in flare_set
            else np.zeros(flare_set.sizes["sample"], int))
    quiet_pool = np.flatnonzero(held & (step == step.min()))
    flare_pool = np.flatnonzero(held & (step > step.min()))
    if quiet_pool.size == 0 or flare_pool.size == 0:
        quiet_pool = flare_pool = np.flatnonzero(held)
    yy, xx = np.mgrid[0:ny, 0:nx]
    centre = ny / 2 + 0.25 * ny * np.sin(2 * np.pi * xx / nx)
    ribbon = np.abs(yy - centre) < ribbon_width
    idx = np.where(ribbon, rng.choice(flare_pool, shape), rng.choice(quiet_pool, shape))
    sub = flare_set.isel(sample=idx.ravel())
    out = {}
    for line in LINES:
        dim = flare_set[line].dims[-1]
        grid = flare_set[dim].values
        pos = crisp_positions(line)
        prof = sub[line].values
        # linear interpolation as a matrix on the shared grid (batched)
        j = np.clip(np.searchsorted(grid, pos) - 1, 0, grid.size - 2)
        t = (pos - grid[j]) / (grid[j + 1] - grid[j])
        obs = prof[:, j] * (1 - t) + prof[:, j + 1] * t
        obs = obs + noise * obs.max(-1, keepdims=True) * rng.standard_normal(obs.shape)
        out[line] = xr.DataArray(obs.reshape(ny, nx, pos.size), dims=("y", "x", dim),
                                 coords={dim: pos},
                                 attrs={"units": flare_set[line].attrs.get("units", "")})
    cube = xr.Dataset(out, coords={"y": np.arange(ny), "x": np.arange(nx)},
                      attrs={"source": "synthetic CRISP-like map from the flare set",
                             "noise_relative": noise})
    truth = xr.Dataset(
        {q: (("y", "x", "height"), sub[q].values.reshape(ny, nx, -1), {"units": UNITS[q]})
         for q in QUANTITIES}
        | {"ribbon": (("y", "x"), ribbon), "sample": (("y", "x"), idx)},
        coords={"height": flare_set["height"].values, "y": np.arange(ny), "x": np.arange(nx)})
    return cube, truth
