"""LTE forward models for the Levenberg–Marquardt inversions.

:class:`LTEForward` chains a :class:`~iris_lab.nodes.NodeModel` (node values →
stratifications), the :class:`~iris_lab.synthesis.lte.LTESynthesizer` (Stokes
spectra), an optional instrument matrix (spectral PSF + resampling) and the
normalisation to a continuum level, and flattens the result to the data
vector ``(p, 4 · n_wavelength)`` used by :mod:`iris_lab.inversion.lm` and
:mod:`iris_lab.inversion.coupled`. It is differentiable end to end, so
Jacobians come from forward-mode autodiff.

:func:`invert_hinode_mode1` runs a mode-1 (atmosphere only) inversion of
Hinode/SP Fe I 6301/6302 spectra with the SP instrument profile.

Example
-------
>>> from iris_lab.inversion.lte import default_nodes
>>> sorted(default_nodes())
['azimuth', 'b_field', 'inclination', 'temperature', 'v_los', 'v_turb']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

STOKES_SIZE = 4


def default_nodes() -> dict[str, list[float]]:
    """The node layout of the coupled log(gf) experiment (Vukadinović et al.
    2024): T at −2.5, −1.5, −0.5, 0.4; v_los, v_turb, B, inclination at
    −2.2, −1.1, 0.0; the azimuth at one node (−1.1).

    The azimuth must be free: with it fixed, Stokes U cannot be fitted at all
    and the fields bend to fit Q, which left a median χ²_ν of 374 instead of
    10 on a 4×4 noise-free map of :mod:`iris_lab.worlds.photosphere`. One
    node because those atmospheres have a depth-independent azimuth (three
    nodes fitted them worse in the same number of iterations: χ²_ν 22)."""
    three = [-2.2, -1.1, 0.0]
    return {"temperature": [-2.5, -1.5, -0.5, 0.4], "v_los": list(three),
            "v_turb": list(three), "b_field": list(three), "inclination": list(three),
            "azimuth": [-1.1]}


class LTEForward:
    """Node parameters (and atomic offsets) → flattened normalised Stokes data.

    Parameters
    ----------
    node_model
        :class:`~iris_lab.nodes.NodeModel`.
    synthesizer
        :class:`~iris_lab.synthesis.lte.LTESynthesizer` on the synthesis grid.
    instrument
        Optional matrix ``(n_obs, n_synthesis)`` (PSF and resampling).
    continuum
        Divide the spectra by this intensity (e.g. the quiet-Sun continuum).
    fixed
        Optional fixed stratifications overriding the node model output
        (``{name: tensor (depth,)}``).

    Example
    -------
    >>> LTEForward.__name__
    'LTEForward'
    """

    def __init__(self, node_model: Any, synthesizer: Any, *, instrument: Any = None,
                 continuum: float = 1.0, fixed: Mapping[str, Any] | None = None) -> None:
        self.node_model = node_model
        self.synthesizer = synthesizer
        dtype = torch.float64
        device = synthesizer.device
        self.instrument = None if instrument is None else torch.as_tensor(
            np.asarray(instrument), dtype=dtype, device=device)
        self.continuum = float(continuum)
        self.fixed = {k: torch.as_tensor(v, dtype=dtype, device=device)
                      for k, v in (fixed or {}).items()}

    @property
    def n_wavelength(self) -> int:
        return (self.instrument.shape[0] if self.instrument is not None
                else self.synthesizer.n_wavelength)

    @property
    def n_data(self) -> int:
        return STOKES_SIZE * self.n_wavelength

    def stokes(self, params: torch.Tensor, log_gf_offset: torch.Tensor | None = None,
               dlambda: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised Stokes spectra ``(p, 4, n_wavelength)``."""
        fields = self.node_model.interpolate(params)
        fields.update(self.fixed)
        fields["b_field"] = torch.abs(fields["b_field"])
        out = self.synthesizer.stokes(fields, log_gf_offset=log_gf_offset, dlambda=dlambda)
        if self.instrument is not None:
            out = out @ self.instrument.T
        return out / self.continuum

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        """Flattened data vector ``(p, 4 · n_wavelength)`` (mode 1)."""
        return self.stokes(params).reshape(params.shape[0], -1)

    def atomic(self, params: torch.Tensor, log_gf_offset: torch.Tensor,
               dlambda: torch.Tensor) -> torch.Tensor:
        """Flattened data with per-pixel atomic offsets (modes 2, 3, averaged)."""
        return self.stokes(params, log_gf_offset, dlambda).reshape(params.shape[0], -1)


def stokes_weights(n_wavelength: int, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                   ) -> np.ndarray:
    """Per-sample weights of the flattened data from per-Stokes weights.

    Example
    -------
    >>> stokes_weights(2, (1, 0, 0, 2)).tolist()
    [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0]
    """
    return np.repeat(np.asarray(weights, dtype=float), n_wavelength)


def quiet_sun_start(model, *, b_field: float = 200.0, inclination: float = 1.2,
                    v_turb: float = 1.0e5, azimuth: float | None = 0.5) -> np.ndarray:
    """Starting node values: FAL-C at the nodes with a weak, inclined field.

    Parameters
    ----------
    model
        The :class:`iris_lab.nodes.NodeModel` whose parameters are set.
    b_field, inclination, v_turb, azimuth
        Values [G, rad, cm s⁻¹, rad] given to every node of that parameter;
        ``azimuth=None`` keeps FAL-C's (zero).

    Returns
    -------
    numpy.ndarray
        ``(model.n_parameters,)``.

    Example
    -------
    >>> from iris_lab.nodes import NodeModel
    >>> model = NodeModel({"temperature": [-1.0, 0.0], "b_field": [0.0]},
    ...                   log_tau=np.linspace(-3, 1, 41))
    >>> float(quiet_sun_start(model)[-1])
    200.0
    """
    from iris_lab.atmosphere import Atmosphere

    start = model.parameters_from(Atmosphere.reference("falc")).numpy()
    values = {"b_field": b_field, "inclination": inclination, "v_turb": v_turb,
              "azimuth": azimuth}
    for i, name in enumerate(model.parameter_names):
        for field, value in values.items():
            if value is not None and name.startswith(field):
                start[i] = value
    return start


def photospheric_starts(model) -> np.ndarray:
    """Three starting atmospheres for photospheric maps: quiet Sun, penumbra, umbra.

    FAL-C at the nodes with a weak inclined field (:func:`quiet_sun_start`);
    the same 10 % cooler with a 1500 G, nearly horizontal field; and 30 %
    cooler with a 2700 G, nearly vertical field. Screening them per pixel
    (:func:`iris_lab.inversion.lm.screen_starts`) starts sunspot pixels near
    their own basin instead of the quiet Sun's.

    Parameters
    ----------
    model
        The :class:`iris_lab.nodes.NodeModel` whose parameters are set.

    Returns
    -------
    numpy.ndarray
        ``(3, model.n_parameters)``.

    Example
    -------
    >>> from iris_lab.nodes import NodeModel
    >>> model = NodeModel({"temperature": [-1.0, 0.0], "b_field": [0.0]},
    ...                   log_tau=np.linspace(-3, 1, 41))
    >>> photospheric_starts(model)[:, -1].tolist()
    [300.0, 1500.0, 2700.0]
    """
    out = []
    for t_scale, b_field, inclination in ((1.0, 300.0, 1.0), (0.9, 1500.0, 1.4),
                                          (0.7, 2700.0, 0.25)):
        start = quiet_sun_start(model, b_field=b_field, inclination=inclination,
                                v_turb=0.8e5, azimuth=None)
        for i, name in enumerate(model.parameter_names):
            if name.startswith("temperature"):
                start[i] *= t_scale
        out.append(start)
    return np.stack(out)


def azimuth_from_stokes(stokes_q: Any, stokes_u: Any, reference_q: Any) -> np.ndarray:
    """Field azimuth of every pixel from its linear polarisation.

    For a field whose azimuth φ does not change with depth, a pixel's Stokes
    Q and U are one profile ``L(λ)`` (the linear polarisation in the field's
    frame) times ``cos 2φ`` and ``sin 2φ``. Projecting Q and U on a model
    profile of ``L`` (``reference_q``: Stokes Q of a start model at φ = 0,
    whose sign pattern is set by the Zeeman pattern, not by the field
    strength or inclination) gives ``2φ`` with its sign, so the start lands
    in the right one of the two azimuths that differ by 90°. Magneto-optical
    effects rotate the plane of polarisation a little (0.06 rad at 1500 G in
    the 4016 Å lines), so this is a starting value for a fit. Without linear
    polarisation the azimuth is 0.

    Parameters
    ----------
    stokes_q, stokes_u
        Observed Q and U ``(..., n_wavelength)``.
    reference_q
        Model Q at azimuth 0 ``(n_wavelength,)`` or broadcastable.

    Returns
    -------
    numpy.ndarray
        Azimuth [rad] in (−π/2, π/2], shape ``(...)``.

    Example
    -------
    >>> profile = np.array([0.1, -0.3, 0.1])
    >>> phi = 0.4
    >>> q, u = profile * np.cos(2 * phi), profile * np.sin(2 * phi)
    >>> round(float(azimuth_from_stokes(q, u, 2.0 * profile)), 6)
    0.4
    """
    q = np.asarray(stokes_q, dtype=float)
    u = np.asarray(stokes_u, dtype=float)
    ref = np.asarray(reference_q, dtype=float)
    good_q, good_u = np.isfinite(q), np.isfinite(u)
    cq = np.where(good_q, q * ref, 0.0).sum(-1)
    cu = np.where(good_u, u * ref, 0.0).sum(-1)
    return 0.5 * np.arctan2(cu, cq)


#: The screened starts of :func:`invert_hinode_mode1`, in the order of its ``start``:
#: atmosphere, v_los shift [km/s], and azimuth from the pixel's Q and U or as given.
HINODE_START_NAMES = tuple(f"{atm}_v{v:+.1f}_{az}" for az in ("azimuth_qu", "azimuth_fixed")
                           for atm in ("quiet", "penumbra", "umbra")
                           for v in (-1.5, 0.0, 1.5))


def _hinode_starts(model, forward, data: np.ndarray, n_wavelength: int, sigma: Any,
                   weights: Any, screen: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel starting node values of :func:`invert_hinode_mode1` and the
    index of each pixel's start (in :data:`HINODE_START_NAMES` when screened)."""
    import torch

    from iris_lab.inversion.lm import screen_starts

    n_pix = data.shape[0]
    quiet = quiet_sun_start(model)
    if not screen:
        plain = HINODE_START_NAMES.index("quiet_v+0.0_azimuth_fixed")
        return (np.broadcast_to(quiet, (n_pix, quiet.size)).copy(),
                np.full(n_pix, plain, dtype=int))
    names = model.parameter_names
    v_nodes = [i for i, name in enumerate(names) if name.startswith("v_los")]
    azimuth_nodes = [i for i, name in enumerate(names) if name.startswith("azimuth")]
    candidates = []
    # the unscreened start is a candidate, so screening never starts worse
    for atmosphere in (quiet, *photospheric_starts(model)[1:]):
        for shift in (-1.5e5, 0.0, 1.5e5):
            candidate = atmosphere.copy()
            candidate[v_nodes] += shift
            candidates.append(candidate)
    fixed = np.broadcast_to(np.stack(candidates), (n_pix, len(candidates), len(names)))
    own = fixed.copy()
    if azimuth_nodes:  # the azimuth of each pixel's own linear polarisation
        at_zero = quiet.copy()
        at_zero[azimuth_nodes] = 0.0
        with torch.no_grad():
            model_q = forward(torch.as_tensor(at_zero[None], dtype=torch.float64))
        stokes = data.reshape(n_pix, 4, n_wavelength)
        own[..., azimuth_nodes] = azimuth_from_stokes(
            stokes[:, 1], stokes[:, 2],
            model_q.reshape(4, n_wavelength)[1].cpu().numpy())[:, None, None]
    x0 = np.concatenate([own, fixed], axis=1)
    start, choice = screen_starts(forward, torch.as_tensor(x0), torch.as_tensor(data),
                                  sigma, weights)
    return start.cpu().numpy(), choice.cpu().numpy()


def invert_hinode_mode1(path: str, profile_path: str, *, nodes: Mapping | None = None,
                        max_iter: int = 30, n_restarts: int = 0,
                        stokes_weight: Sequence[float] = (1.0, 4.0, 4.0, 2.0),
                        pixels: Any = None, progress: bool = False, jacobian: str = "finite",
                        screen: bool = True):
    """Mode-1 LTE inversion of a Hinode/SP Fe I 6301/6302 cube.

    The synthesis runs on a grid twice as fine as the observed one (padded by
    the width of the instrument profile) and is mapped onto the observed
    samples by the SP instrument profile. The telluric O2 lines are masked in
    Stokes I. The noise σ is estimated from Q/U in line-free windows
    (:func:`iris_lab.io.hinode.estimate_noise`) and used for all Stokes
    parameters, so χ²_ν ≈ 1 means a fit at the noise level.

    Parameters
    ----------
    path, profile_path
        The FITS cube and the instrument-profile table.
    nodes
        Node layout (default: T at −2.5, −1.2, 0.2; v_los, B, inclination at
        −2.0, 0.0; v_turb and azimuth at −1.0).
    max_iter, n_restarts
        LM settings.
    stokes_weight
        Weights of I, Q, U, V in χ² (the usual up-weighting of polarisation).
    pixels
        Optional index into the flattened (y, x) pixels (for quick tests).
    progress
        tqdm bar over the iterations.
    jacobian
        Jacobian of the LM steps (:func:`iris_lab.inversion.lm.jacobian`):
        batched finite differences by default; ``"jvp"`` differentiates
        through the hydrostatic-equilibrium iterations and was 35× slower on
        2 pixels for the same χ² after 5 iterations.
    screen
        Start every pixel from the best of 18 (:data:`HINODE_START_NAMES`):
        the quiet Sun of :func:`quiet_sun_start`, the penumbra and umbra of
        :func:`photospheric_starts`, each at v_los −1.5, 0, +1.5 km/s and with
        the azimuth of the pixel's own linear polarisation
        (:func:`azimuth_from_stokes`) or the start's, chosen by one batched
        forward call (:func:`iris_lab.inversion.lm.screen_starts`); ``False``:
        the quiet Sun for every pixel (which is among the 18, so screening
        never starts worse).

    Returns
    -------
    xarray.Dataset
        The LM result (per-pixel node values, σ, χ², quality) reshaped to
        ``(y, x)`` when all pixels are inverted, plus ``temperature``,
        ``v_los``, ``b_field``, ``inclination`` at log τ = −1 and 0
        (``log_tau_map`` dimension), ``observed`` and ``fit`` spectra and the
        noise estimate in attrs ``noise_sigma``, and ``start`` (the index of
        each pixel's start in :data:`HINODE_START_NAMES`).

    Notes
    -----
    On the shipped 5 × 5 quiet-Sun sample, χ²_ν after 10 iterations is about
    90 (median of the 25 pixels), and 97 % of it is Stokes I: its rms residual
    is 14–22 σ (median 19 σ), largest in the core of Fe I 6302.5 Å, while Q, U
    and V fit to 0.9–1.0 σ (they hold little signal above the noise here).
    One LTE component with three temperature nodes and these atomic data
    cannot reproduce the cores; four or five temperature nodes lower
    χ²_ν to about 50 and 40 but give temperatures that fall with depth between
    log τ −2 and −1 or run to their bounds at the top node.
    """

    from iris_lab.atomic import LineList
    from iris_lab.inversion.lm import LevenbergMarquardt
    from iris_lab.io.hinode import (
        estimate_noise,
        instrument_matrix,
        read_hinode_sp,
        read_instrument_profile,
        telluric_free,
    )
    from iris_lab.nodes import NodeModel
    from iris_lab.synthesis.lte import LTESynthesizer

    obs = read_hinode_sp(path)
    wave = obs.wavelength.values
    spectra = obs["spectra"].values                              # (y, x, 4, w)
    ny, nx = spectra.shape[:2]
    sigma = estimate_noise(spectra, wave)
    offsets, trans = read_instrument_profile(profile_path)
    step = np.median(np.diff(wave)) / 2
    pad = offsets.max() + step
    fine = np.arange(wave[0] - pad, wave[-1] + pad + step / 2, step)
    inst = instrument_matrix(fine, wave, offsets, trans)
    lines = LineList.shipped("fe6301_6302")
    synth = LTESynthesizer(lines, fine)
    i_c = float(np.asarray(synth.continuum_intensity().detach().cpu()).ravel()[0])
    nodes = dict(nodes or {"temperature": [-2.5, -1.2, 0.2], "v_los": [-2.0, 0.0],
                           "v_turb": [-1.0], "b_field": [-2.0, 0.0],
                           "inclination": [-2.0, 0.0], "azimuth": [-1.0]})
    log_tau = np.round(np.arange(-4.0, 1.0 + 1e-9, 0.1), 2)
    model = NodeModel(nodes, log_tau=log_tau)
    fwd = LTEForward(model, synth, instrument=inst, continuum=i_c)

    data = spectra.reshape(ny * nx, 4 * wave.size)
    if pixels is not None:
        data = data[np.asarray(pixels)]
    n_pix = data.shape[0]
    weights = stokes_weights(wave.size, stokes_weight)
    weights[: wave.size][~telluric_free(wave)] = 0.0
    names = model.parameter_names
    lower, upper = model.bounds
    x0, choice = _hinode_starts(model, fwd, data, wave.size, sigma, weights, screen)
    lm = LevenbergMarquardt(max_iter=max_iter, n_restarts=n_restarts, restart_scale=0.05,
                            progress=progress, jacobian=jacobian)
    lm.fit(fwd, data, x0, sigma=sigma, weights=weights, lower=lower, upper=upper,
           parameter_names=names)
    res = lm.result_
    shape = (ny, nx) if n_pix == ny * nx else (n_pix,)
    dims = ("y", "x") if n_pix == ny * nx else ("pixel",)
    ds = res.to_dataset(batch_shape=shape, batch_dims=dims)
    fields = model.interpolate(res.x)
    at = [int(np.argmin(np.abs(log_tau - v))) for v in (-1.0, 0.0)]
    for name, units in (("temperature", "K"), ("v_los", "cm / s"), ("b_field", "G"),
                        ("inclination", "rad")):
        values = fields[name][..., at].detach().cpu().numpy()
        if name == "b_field":
            values = np.abs(values)
        ds[name] = (dims + ("log_tau_map",), values.reshape(*shape, 2), {"units": units})
    ds = ds.assign_coords(log_tau_map=[-1.0, 0.0], stokes=list("IQUV"),
                          wavelength=("wavelength", wave, {"units": "Angstrom", "medium": "air"}))
    ds["start"] = (dims, choice.reshape(shape),
                   {"long_name": "starting atmosphere",
                    "flag_meanings": " ".join(HINODE_START_NAMES),
                    "flag_values": list(range(len(HINODE_START_NAMES)))})
    ds["observed"] = (dims + ("stokes", "wavelength"), data.reshape(*shape, 4, wave.size))
    ds["fit"] = (dims + ("stokes", "wavelength"),
                 res.model.detach().cpu().numpy().reshape(*shape, 4, wave.size))
    ds.attrs.update({"noise_sigma": sigma, "noise_estimate": "robust std of Q, U in line-free "
                     "windows (continuum, away from Fe I and telluric O2 lines)",
                     "stokes_weight": list(map(float, stokes_weight)),
                     "instrument": "Hinode/SP", "mode": "1"})
    return ds
