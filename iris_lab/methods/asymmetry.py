"""Line-profile asymmetries of flare Hα / Ca II 8542 profiles.

Moment measures in the spirit of Mein et al. (1997) and Kuridze et al. (2015),
as used to compare observed and round-trip profiles in Osborne et al. (2019).
With ``E(λ)`` the line signal above its background (``I − min I`` for emission
profiles, ``max I − I`` for absorption profiles) integrated (trapezoid rule on
a 16× refined linear interpolation of the sampled profile):

- ``lambda0`` λ0 — intensity-weighted line centre, ∫λE / ∫E;
- ``sigma`` σ — intensity-weighted width, (∫(λ−λ0)²E / ∫E)^½;
- ``lambda0_blue`` λ0B, ``lambda0_red`` λ0R — centroids of the parts of
  ``E`` blueward and redward of λ0;
- ``delta_lambda`` δλ = (λ0R − λ0B) / 2, the half-width between them;
- ``ib_ir`` I_B/I_R — signal integrated blueward over that integrated
  redward of the rest line centre (> 1: blue asymmetry, < 1: red asymmetry).

Wavelengths are offsets from the rest line centre in Å.

Example
-------
>>> import numpy as np
>>> from iris_lab.methods.asymmetry import line_asymmetry
>>> dl = np.linspace(-1.4, 1.4, 29)
>>> prof = 1.0 + 3.0 * np.exp(-0.5 * ((dl - 0.1) / 0.2) ** 2)
>>> a = line_asymmetry(dl, prof)
>>> round(float(a["lambda0"]), 3), round(float(a["sigma"]), 2)
(0.1, 0.2)
"""

from __future__ import annotations

from typing import Literal

import numpy as np

NAMES: tuple[str, ...] = ("lambda0", "sigma", "lambda0_blue", "lambda0_red", "delta_lambda",
                          "ib_ir")
LONG_NAMES: dict[str, str] = {
    "lambda0": "intensity-weighted line centre offset",
    "sigma": "intensity-weighted line width",
    "lambda0_blue": "centroid of the blue half of the line",
    "lambda0_red": "centroid of the red half of the line",
    "delta_lambda": "half distance between blue and red centroids",
    "ib_ir": "blue-to-red integrated intensity ratio about the rest line centre",
}


def _interp_matrix(dl: np.ndarray, refine: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation matrix onto a grid ``refine`` times finer."""
    n = dl.size
    fine = np.concatenate([np.linspace(dl[i], dl[i + 1], refine, endpoint=False)
                           for i in range(n - 1)] + [dl[-1:]])
    idx = np.clip(np.searchsorted(dl, fine, side="right") - 1, 0, n - 2)
    t = (fine - dl[idx]) / (dl[idx + 1] - dl[idx])
    w = np.zeros((fine.size, n))
    rows = np.arange(fine.size)
    w[rows, idx] = 1.0 - t
    w[rows, idx + 1] += t
    return fine, w


def line_asymmetry(dl: np.ndarray, profiles: np.ndarray, *,
                   kind: Literal["emission", "absorption"] = "emission",
                   line_centre: float = 0.0, refine: int = 16) -> dict[str, np.ndarray]:
    """Asymmetry measures of a batch of line profiles.

    Parameters
    ----------
    dl
        ``(n_wavelength,)`` increasing offsets from the rest line centre [Å].
    profiles
        ``(..., n_wavelength)`` intensities (any units; only shapes matter).
    kind
        ``"emission"`` (signal ``I − min I``) or ``"absorption"`` (``max I − I``).
    line_centre
        Rest line centre on the ``dl`` axis, for ``ib_ir``.
    refine
        Sub-samples per interval for the integrals.

    Returns
    -------
    dict
        ``lambda0``, ``sigma``, ``lambda0_blue``, ``lambda0_red``,
        ``delta_lambda`` [Å] and ``ib_ir``, each of shape ``(...)``; NaN where
        a profile has no signal or non-finite samples.

    Raises
    ------
    ValueError
        For a wavelength axis that is not 1-D increasing or does not match.

    Example
    -------
    >>> import numpy as np
    >>> dl = np.linspace(-1.0, 1.0, 41)
    >>> a = line_asymmetry(dl, np.exp(-0.5 * (dl / 0.15) ** 2)[None].repeat(3, 0))
    >>> a["ib_ir"].shape, bool(np.allclose(a["ib_ir"], 1.0))
    ((3,), True)
    """
    dl = np.asarray(dl, dtype=np.float64)
    prof = np.asarray(profiles, dtype=np.float64)
    if dl.ndim != 1 or dl.size < 3 or np.any(np.diff(dl) <= 0):
        raise ValueError("dl must be a 1-D increasing wavelength axis with at least 3 samples")
    if prof.shape[-1] != dl.size:
        raise ValueError(f"profiles have {prof.shape[-1]} samples, dl has {dl.size}")
    if kind not in ("emission", "absorption"):
        raise ValueError(f"kind must be 'emission' or 'absorption', got {kind!r}")
    batch = prof.shape[:-1]
    p = prof.reshape(-1, dl.size)
    bad = ~np.isfinite(p).all(-1)
    p = np.where(bad[:, None], 0.0, p)
    e = p - p.min(-1, keepdims=True) if kind == "emission" else p.max(-1, keepdims=True) - p
    lam, w = _interp_matrix(dl, refine)
    ef = e @ w.T  # (n, n_fine)
    wt = np.empty_like(lam)  # trapezoid weights
    wt[1:-1] = 0.5 * (lam[2:] - lam[:-2])
    wt[0], wt[-1] = 0.5 * (lam[1] - lam[0]), 0.5 * (lam[-1] - lam[-2])
    m = ef * wt
    with np.errstate(invalid="ignore", divide="ignore"):
        total = m.sum(-1)
        lam0 = (m * lam).sum(-1) / total
        sigma = np.sqrt((m * (lam - lam0[:, None]) ** 2).sum(-1) / total)
        blue = lam < lam0[:, None]
        mb, mr = np.where(blue, m, 0.0), np.where(blue, 0.0, m)
        lb = (mb * lam).sum(-1) / mb.sum(-1)
        lr = (mr * lam).sum(-1) / mr.sum(-1)
        # ib/ir about the rest centre: half weight on a sample sitting exactly on it
        side = np.sign(lam - line_centre)
        ib = (m * (side < 0) + 0.5 * m * (side == 0)).sum(-1)
        ir = (m * (side > 0) + 0.5 * m * (side == 0)).sum(-1)
        ratio = ib / ir
    out = {"lambda0": lam0, "sigma": sigma, "lambda0_blue": lb, "lambda0_red": lr,
           "delta_lambda": 0.5 * (lr - lb), "ib_ir": ratio}
    nosig = bad | ~(total > 0)
    return {k: np.where(nosig, np.nan, v).reshape(batch) for k, v in out.items()}


def asymmetry_map(profiles, *, kind: Literal["emission", "absorption"] = "emission",
                  line_centre: float = 0.0):
    """Asymmetry measures of every pixel of a profile cube, as an ``xarray.Dataset``.

    Parameters
    ----------
    profiles
        ``xarray.DataArray`` whose last dimension carries the wavelength
        offsets [Å] as a coordinate, e.g. dims ``(y, x, dl_halpha)``.
    kind, line_centre
        As in :func:`line_asymmetry`.

    Returns
    -------
    xarray.Dataset
        Variables of :data:`NAMES` on the leading dims, with units.

    Example
    -------
    >>> import numpy as np, xarray as xr
    >>> dl = np.linspace(-1.4, 1.4, 29)
    >>> cube = xr.DataArray(np.exp(-0.5 * (dl / 0.3) ** 2) * np.ones((2, 3, 1)),
    ...                     dims=("y", "x", "dl_halpha"), coords={"dl_halpha": dl})
    >>> asymmetry_map(cube)["sigma"].dims
    ('y', 'x')
    """
    import xarray as xr

    wdim = profiles.dims[-1]
    res = line_asymmetry(profiles[wdim].values, profiles.values, kind=kind,
                         line_centre=line_centre)
    dims = profiles.dims[:-1]
    coords = {d: profiles[d].values for d in dims if d in profiles.coords}
    return xr.Dataset(
        {k: xr.DataArray(v, dims=dims, attrs={"units": "" if k == "ib_ir" else "Angstrom",
                                              "long_name": LONG_NAMES[k]})
         for k, v in res.items()},
        coords=coords, attrs={"kind": kind, "line_centre_offset": line_centre})
