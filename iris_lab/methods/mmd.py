"""Maximum mean discrepancy with the inverse-multiquadric kernel.

The invertible network of :mod:`iris_lab.methods.inn` is trained with two
distribution-matching terms (Ardizzone et al. 2019; Osborne et al. 2019): the
joint distribution of predicted profiles and latent variables against
``[y, N(0, I)]``, and the distribution of atmospheres drawn backwards from
random latents against the true atmospheres. Both use the squared MMD with the
inverse-multiquadric (IMQ) kernel

.. math:: k_\\alpha(a, b) = \\frac{\\alpha}{\\alpha + \\lVert a - b\\rVert^2},

whose scale ``α`` is re-chosen during training where MMD²(α) is largest, i.e.
where the kernel best separates the two samples.

Example
-------
>>> import torch
>>> from iris_lab.methods.mmd import mmd2_imq
>>> g = torch.Generator().manual_seed(0)
>>> a = torch.randn(256, 4, generator=g)
>>> b = torch.randn(256, 4, generator=g) + 2.0
>>> bool(mmd2_imq(a, b, 2.0) > 10 * mmd2_imq(a, a[torch.randperm(256, generator=g)], 2.0))
True
"""

from __future__ import annotations

import numpy as np
import torch

#: Default grid of IMQ scales searched when re-choosing α (Radynversion used 0.5–500).
ALPHA_GRID: np.ndarray = np.logspace(np.log10(0.5), np.log10(500.0), 48)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aa = (a * a).sum(-1, keepdim=True)
    bb = (b * b).sum(-1, keepdim=True)
    return (aa + bb.transpose(-1, -2) - 2.0 * a @ b.transpose(-1, -2)).clamp_min(0.0)


def mmd2_imq(a: torch.Tensor, b: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Biased estimate of MMD² between two samples with the IMQ kernel.

    Parameters
    ----------
    a, b
        Samples of shape ``(n, d)`` and ``(m, d)``.
    alpha
        Kernel scale ``α`` (a float, or a tensor of shape ``(k,)`` to
        evaluate ``k`` scales at once; the result then has shape ``(k,)``).

    Returns
    -------
    torch.Tensor
        ``mean k(a, a') + mean k(b, b') - 2 mean k(a, b)`` (≥ 0 up to rounding).

    Example
    -------
    >>> import torch
    >>> a = torch.zeros(3, 2)
    >>> float(mmd2_imq(a, a, 1.0))
    0.0
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"mmd2_imq needs (n, d) and (m, d) samples, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    alpha_t = torch.as_tensor(alpha, dtype=a.dtype, device=a.device)
    scalar = alpha_t.ndim == 0
    alpha_t = alpha_t.reshape(-1, 1, 1)
    dxx, dyy, dxy = _sq_dists(a, a), _sq_dists(b, b), _sq_dists(a, b)
    out = ((alpha_t / (alpha_t + dxx)).mean((-1, -2)) + (alpha_t / (alpha_t + dyy)).mean((-1, -2))
           - 2.0 * (alpha_t / (alpha_t + dxy)).mean((-1, -2)))
    return out[0] if scalar else out


def choose_alpha(a: torch.Tensor, b: torch.Tensor,
                 alphas: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """The IMQ scale where MMD²(α) between two samples is largest.

    Parameters
    ----------
    a, b
        Samples ``(n, d)``, ``(m, d)`` (gradients are not tracked).
    alphas
        Candidate scales; :data:`ALPHA_GRID` by default.

    Returns
    -------
    alpha, curve
        The chosen scale and MMD² at every candidate.

    Example
    -------
    >>> import torch
    >>> g = torch.Generator().manual_seed(1)
    >>> alpha, curve = choose_alpha(torch.randn(200, 3, generator=g),
    ...                             torch.randn(200, 3, generator=g) * 3.0)
    >>> 0.5 <= alpha <= 500.0 and curve.shape == ALPHA_GRID.shape
    True
    """
    grid = ALPHA_GRID if alphas is None else np.asarray(alphas, dtype=float)
    with torch.no_grad():
        curve = mmd2_imq(a.detach(), b.detach(), torch.as_tensor(grid, dtype=a.dtype))
    curve_np = curve.cpu().numpy()
    return float(grid[int(np.argmax(curve_np))]), curve_np
