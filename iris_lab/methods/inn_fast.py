"""Inference-only evaluator of FlareINN's FrEIA network, and fast posterior percentiles.

:class:`FrozenINN` extracts the weights of a FrEIA ``SequenceINN`` made of
``GLOWCouplingBlock`` affine couplings and ``PermuteRandom`` permutations once,
and runs either direction on cache-sized row chunks with preallocated buffers:
``torch.addmm(out=...)`` for the linear layers, in-place leaky ReLU, the
coupling halves updated in place (no ``split``/``cat`` copies), one gather per
permutation, and no Jacobian. On the CPU the element-wise work of a coupling
(``0.636 atan``, clamp, ``exp``, the affine update) and of the bias + leaky
ReLU runs in one fused pass of a small C kernel compiled with the system C
compiler on first use and cached on disk (``IRIS_LAB_CACHE``, default
``~/.cache/iris_lab``); ``torch.atan`` alone costs ~4 ns per element here,
more than the matrix products of a 96-wide network. Without a compiler, or on
a GPU, the same steps run as torch operations.

:func:`draw_percentiles` gives the linear-interpolation percentiles of
``torch.quantile`` over the draws axis of a ``(pixels, draws, quantities)``
array by sorting every pixel's draws in place with Batcher's odd-even merge
network, vectorised across the contiguous quantities (``torch.quantile`` on
that layout costs about as much as the network itself).

Example
-------
>>> import torch
>>> from iris_lab.methods.inn import FlareINN
>>> inn = FlareINN(width=16, hidden=8, n_latent=4, n_blocks=2, progress=False)
>>> inn.n_height_, inn.n_halpha_, inn.n_ca8542_ = 4, 3, 3
>>> inn._build()
>>> fast = FrozenINN.from_sequence(inn.net_)
>>> x = torch.randn(5, 16)
>>> bool(torch.allclose(fast.reverse(fast.forward(x)), x, atol=1e-5))
True
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: FrEIA's ATAN soft clamp: ``s = clamp * (0.636 * atan(u))``.
ATAN_FACTOR = 0.636

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

/* Cephes atanf: relative error ~1e-7 (float32 rounding); branch-free so it vectorises. */
static inline float k_atan(float x) {
    float ax = fabsf(x);
    int big = ax > 2.414213562373095f;
    int mid = ax > 0.4142135623730950f;
    float num = big ? -1.0f : (mid ? ax - 1.0f : ax);
    float den = big ? ax : (mid ? ax + 1.0f : 1.0f);
    float y0 = big ? 1.5707963267948966f : (mid ? 0.7853981633974483f : 0.0f);
    float r = num / den;
    float z = r * r;
    float z2 = z * z;
    /* the Cephes polynomial in Estrin's form: a shorter dependency chain than Horner's */
    float p = (1.99777106478e-1f * z - 3.33329491539e-1f)
              + z2 * (8.05374449538e-2f * z - 1.38776856032e-1f);
    float y = (p * z) * r + r + y0;
    return x < 0.0f ? -y : y;
}

/* Cephes expf: relative error ~1e-7 on [-87, 88]. */
static inline float k_exp(float x) {
    x = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    float z = x * x;
    float q = (1.6666665459e-1f * x + 5.0000001201e-1f)
              + z * ((8.3334519073e-3f * x + 4.1665795894e-2f)
                     + z * (1.9875691500e-4f * x + 1.3981999507e-3f));
    float y = q * z + x + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float p;
    memcpy(&p, &e, 4);
    return y * p;
}

/* Affine coupling update of one half in place; a = [s_raw | t] (n, 2h) rows.
   forward: x = exp(s) x + t, reverse: x = (x - t) exp(-s), s = clamp * (f * atan(s_raw)). */
void iris_coupling(int64_t n, int64_t h, float *x, int64_t ldx, const float *a, int64_t lda,
                   float f, float clamp, int rev, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && n * h > 16384)
    for (int64_t i = 0; i < n; i++) {
        float *restrict xi = x + i * ldx;
        const float *restrict s = a + i * lda;
        const float *restrict t = s + h;
        if (rev) {
            for (int64_t j = 0; j < h; j++)
                xi[j] = (xi[j] - t[j]) * k_exp(-(clamp * (f * k_atan(s[j]))));
        } else {
            for (int64_t j = 0; j < h; j++)
                xi[j] = k_exp(clamp * (f * k_atan(s[j]))) * xi[j] + t[j];
        }
    }
}

/* e^{C atan(u)} as one polynomial: atan(u) = sign(u) (y0 + atan(r)) with |r| ≤ tan(π/8)
   (Cephes' reduction), so e^{C atan(u)} = M · g(sign(u) r), M = e^{±C y0} ∈ {1, m1^±1,
   m2^±1} and g(r) = e^{C atan(r)} = c[0] + … + c[10] r^10 (a fit for this C, Estrin's
   form). One division and 14 multiply-adds instead of atan and exp. */
static inline float poly_factor(float u, const float *c, float m1, float m2, float i1,
                                float i2) {
    float au = fabsf(u);
    int big = au > 2.414213562373095f;
    int mid = au > 0.4142135623730950f;
    float num = big ? -1.0f : (mid ? au - 1.0f : au);
    float den = big ? au : (mid ? au + 1.0f : 1.0f);
    float r = num / den;
    int neg = u < 0.0f;
    float m = big ? (neg ? i2 : m2) : (mid ? (neg ? i1 : m1) : 1.0f);
    r = neg ? -r : r;
    float r2 = r * r;
    float r4 = r2 * r2;
    float q0 = (c[0] + c[1] * r) + r2 * (c[2] + c[3] * r);
    float q1 = (c[4] + c[5] * r) + r2 * (c[6] + c[7] * r);
    float q2 = (c[8] + c[9] * r) + r2 * c[10];
    return m * (q0 + r4 * (q1 + r4 * q2));
}

/* The coupling update of iris_coupling with e^{±clamp f atan(s)} from poly_factor. */
void iris_coupling_poly(int64_t n, int64_t h, float *x, int64_t ldx, const float *a,
                        int64_t lda, const float *c, float m1, float m2, int rev, int nt) {
    float cl[11];
    for (int k = 0; k < 11; k++) cl[k] = c[k];
    const float i1 = 1.0f / m1, i2 = 1.0f / m2;
    const float sgn = rev ? -1.0f : 1.0f;
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && n * h > 16384)
    for (int64_t i = 0; i < n; i++) {
        float *restrict xi = x + i * ldx;
        const float *restrict s = a + i * lda;
        const float *restrict t = s + h;
        for (int64_t j = 0; j < h; j++) {
            float e = poly_factor(sgn * s[j], cl, m1, m2, i1, i2);
            xi[j] = rev ? (xi[j] - t[j]) * e : e * xi[j] + t[j];
        }
    }
}

/* One row of the element-wise passes, shared by the stepwise kernels and the driver. */
static inline void bias_leaky_row(int64_t m, float *restrict h, const float *restrict b,
                                  float slope) {
    for (int64_t j = 0; j < m; j++) {
        float v = h[j] + b[j];
        h[j] = v > 0.0f ? v : v * slope;
    }
}

static inline void gather_row(int64_t w, const float *restrict si, float *restrict di,
                              const int64_t *restrict idx) {
    for (int64_t j = 0; j < w; j++) di[j] = si[idx[j]];
}

/* ---------------------------------------------------------------- whole-network driver
   One call runs every block over row chunks small enough that a chunk's buffers stay in
   the L2 cache: the matrix products through the BLAS sgemm that torch itself uses (a
   function pointer), the element-wise work fused as above, the last layer's bias folded
   into the coupling update. No interpreter work between the steps of a chunk. */
typedef void (*iris_sgemm_t)(const char *ta, const char *tb, const int *m, const int *n,
                             const int *k, const float *alpha, const float *a, const int *lda,
                             const float *b, const int *ldb, const float *beta, float *c,
                             const int *ldc);

#define IRIS_MAX_LAYERS 8
typedef struct {
    int32_t n_layers;
    int32_t n_in[IRIS_MAX_LAYERS];
    int32_t n_out[IRIS_MAX_LAYERS];
    const float *w[IRIS_MAX_LAYERS];  /* (n_out, n_in) row-major, as nn.Linear.weight */
    const float *b[IRIS_MAX_LAYERS];
} iris_subnet;

typedef struct {
    int32_t split;     /* length of the first half */
    int32_t poly;      /* 1: polynomial e^{C atan}, 0: Cephes atan and exp */
    float clamp;
    float slope;       /* leaky ReLU slope of both subnetworks */
    float coef[11];
    float m1, m2;
    iris_subnet sub1;  /* reads the first half, updates the second */
    iris_subnet sub2;  /* reads the second half, updates the first */
    const int64_t *perm;      /* forward gather after the block, or NULL */
    const int64_t *perm_inv;
} iris_block;

/* (r, m) rows of a = in @ W^T (+ bias, leaky ReLU for hidden layers) */
static void subnet_rows(iris_sgemm_t gemm, const iris_subnet *s, float slope, int r,
                        const float *in, int ldin, float *h0, float *h1, int ldh, float *out,
                        int ldout) {
    const float one = 1.0f, zero = 0.0f;
    const float *src = in;
    int lds = ldin;
    for (int l = 0; l < s->n_layers; l++) {
        int m = s->n_out[l], k = s->n_in[l];
        int last = l == s->n_layers - 1;
        float *dst = last ? out : (l % 2 ? h1 : h0);
        int ldd = last ? ldout : ldh;
        /* column-major view: dst^T (m, r) = W (k, m)^T-as-stored^T . src^T (k, r) */
        gemm("T", "N", &m, &r, &k, &one, s->w[l], &k, src, &lds, &zero, dst, &ldd);
        if (!last)
            for (int i = 0; i < r; i++) bias_leaky_row(m, dst + (int64_t)i * ldd, s->b[l], slope);
        src = dst;
        lds = ldd;
    }
}

/* x (r, h) ← coupling of x with a = [s_raw | t] (r, 2h) + bias b (2h) */
static void update_rows(const iris_block *B, int r, int h, float *x, int ldx, const float *a,
                        int lda, const float *b, int rev) {
    const float sgn = rev ? -1.0f : 1.0f;
    const float f = 0.636f * B->clamp;
    const float m1 = B->m1, m2 = B->m2, i1 = 1.0f / m1, i2 = 1.0f / m2;
    float c[11];
    for (int k = 0; k < 11; k++) c[k] = B->coef[k];
    for (int i = 0; i < r; i++) {
        float *restrict xi = x + (int64_t)i * ldx;
        const float *restrict s = a + (int64_t)i * lda;
        const float *restrict t = s + h;
        const float *restrict bs = b;
        const float *restrict bt = b + h;
        if (B->poly) {
            for (int j = 0; j < h; j++) {
                float e = poly_factor(sgn * (s[j] + bs[j]), c, m1, m2, i1, i2);
                float tj = t[j] + bt[j];
                xi[j] = rev ? (xi[j] - tj) * e : e * xi[j] + tj;
            }
        } else {
            for (int j = 0; j < h; j++) {
                float e = k_exp(sgn * (f * k_atan(s[j] + bs[j])));
                float tj = t[j] + bt[j];
                xi[j] = rev ? (xi[j] - tj) * e : e * xi[j] + tj;
            }
        }
    }
}

static void gather_rows(int r, int w, const float *src, float *dst, const int64_t *idx) {
    for (int i = 0; i < r; i++) gather_row(w, src + (int64_t)i * w, dst + (int64_t)i * w, idx);
}

/* Optional input and output transforms of iris_inn_run. With y: row i of the input is
   [y[(row0 + i) / n_draws], scale · x[i, :nz], 0…] (posterior draws: the observed profile
   of the row's pixel, its latent draw, zero padding). With mean: out[i, :n_out] =
   mean + std · result[i, :n_out] (the network's representation unscaled). */
typedef struct {
    const float *y;
    int64_t ldy, ny, n_draws, row0, nz;
    float scale;
    const float *mean;
    const float *std;
    int64_t n_out;
} iris_io;

/* out (n, width) = the network (rev: its inverse) applied to x (n, width); out may be x.
   Rows run in chunks of `chunk`, one chunk per thread at a time; io (or NULL) transforms
   the rows on the way in and out. Returns 0, or -1 when a buffer cannot be allocated. */
int iris_inn_run(void *gemm_ptr, int32_t n_blocks, const iris_block *blocks, int64_t n,
                 const float *x, int64_t ldx, float *out, int64_t ldo, int32_t width,
                 int32_t hid, int32_t rev, int64_t chunk, const iris_io *io, int nt) {
    iris_sgemm_t gemm = (iris_sgemm_t)gemm_ptr;
    int64_t n_chunks = (n + chunk - 1) / chunk;
    int failed = 0;
    #pragma omp parallel num_threads(nt) if(nt > 1 && n_chunks > 1)
    {
        size_t per_row = (size_t)(4 * width + 2 * hid);
        float *mem = (float *)malloc(sizeof(float) * per_row * (size_t)chunk);
        if (mem == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        /* every thread sees every allocation's outcome: all run, or none does (an
           in-place call is then left untouched) */
        #pragma omp barrier
        int any_failed;
        #pragma omp atomic read
        any_failed = failed;
        if (!any_failed) {
        #pragma omp for schedule(dynamic)
        for (int64_t q = 0; q < n_chunks; q++) {
            int64_t r0 = q * chunk;
            int r = (int)(n - r0 < chunk ? n - r0 : chunk);
            float *cur = mem, *other = mem + (size_t)width * chunk;
            float *coef = other + (size_t)width * chunk;
            float *h0 = coef + (size_t)2 * width * chunk, *h1 = h0 + (size_t)hid * chunk;
            for (int i = 0; i < r; i++) {
                float *restrict c = cur + (int64_t)i * width;
                const float *restrict xi = x + (r0 + i) * ldx;
                if (io != NULL && io->y != NULL) {
                    const float *yi = io->y + ((io->row0 + r0 + i) / io->n_draws) * io->ldy;
                    int64_t ny = io->ny, nz = io->nz;
                    memcpy(c, yi, sizeof(float) * ny);
                    for (int64_t j = 0; j < nz; j++) c[ny + j] = io->scale * xi[j];
                    memset(c + ny + nz, 0, sizeof(float) * (width - ny - nz));
                } else {
                    memcpy(c, xi, sizeof(float) * width);
                }
            }
            for (int kk = 0; kk < n_blocks; kk++) {
                const iris_block *B = blocks + (rev ? n_blocks - 1 - kk : kk);
                if (rev && B->perm_inv != NULL) {
                    gather_rows(r, width, cur, other, B->perm_inv);
                    float *tmp = cur; cur = other; other = tmp;
                }
                int ha = B->split, hb = width - B->split;
                float *x1 = cur, *x2 = cur + ha;
                const iris_subnet *s1 = &B->sub1, *s2 = &B->sub2;
                if (rev) {
                    subnet_rows(gemm, s1, B->slope, r, x1, width, h0, h1, hid, coef, 2 * hb);
                    update_rows(B, r, hb, x2, width, coef, 2 * hb, s1->b[s1->n_layers - 1], 1);
                    subnet_rows(gemm, s2, B->slope, r, x2, width, h0, h1, hid, coef, 2 * ha);
                    update_rows(B, r, ha, x1, width, coef, 2 * ha, s2->b[s2->n_layers - 1], 1);
                } else {
                    subnet_rows(gemm, s2, B->slope, r, x2, width, h0, h1, hid, coef, 2 * ha);
                    update_rows(B, r, ha, x1, width, coef, 2 * ha, s2->b[s2->n_layers - 1], 0);
                    subnet_rows(gemm, s1, B->slope, r, x1, width, h0, h1, hid, coef, 2 * hb);
                    update_rows(B, r, hb, x2, width, coef, 2 * hb, s1->b[s1->n_layers - 1], 0);
                    if (B->perm != NULL) {
                        gather_rows(r, width, cur, other, B->perm);
                        float *tmp = cur; cur = other; other = tmp;
                    }
                }
            }
            for (int i = 0; i < r; i++) {
                const float *restrict c = cur + (int64_t)i * width;
                float *restrict o = out + (r0 + i) * ldo;
                if (io != NULL && io->mean != NULL) {
                    const float *restrict mu = io->mean, *restrict sd = io->std;
                    for (int64_t j = 0; j < io->n_out; j++) o[j] = c[j] * sd[j] + mu[j];
                } else {
                    memcpy(o, c, sizeof(float) * width);
                }
            }
        }
        }
        free(mem);
    }
    return failed ? -1 : 0;
}

/* h = leaky_relu(h + b) in place, (n, m) rows with leading dimension ld. */
void iris_bias_leaky(int64_t n, int64_t m, float *h, int64_t ld, const float *b, float slope,
                     int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && n * m > 32768)
    for (int64_t i = 0; i < n; i++) bias_leaky_row(m, h + i * ld, b, slope);
}

/* dst[i, j] = src[i, idx[j]] */
void iris_gather(int64_t n, int64_t w, const float *src, int64_t lds, float *dst, int64_t ldd,
                 const int64_t *idx, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && n * w > 32768)
    for (int64_t i = 0; i < n; i++) gather_row(w, src + i * lds, dst + i * ldd, idx);
}

/* Network representation → CGS, per row of x: [log n_e | log T | sign(v) log(|v|/1e5 + 1)]
   (nh values each, leading dimension ldx) → n_e, T, v (n, nh) rows; NaN stays NaN. */
void iris_x_to_cgs(int64_t n, int64_t nh, const float *x, int64_t ldx, float *ne, float *te,
                   float *v, int nt) {
    const float ln10 = 2.302585092994046f;
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && n * nh > 32768)
    for (int64_t i = 0; i < n; i++) {
        const float *restrict xi = x + i * ldx;
        float *restrict a = ne + i * nh;
        float *restrict b = te + i * nh;
        float *restrict c = v + i * nh;
        for (int64_t j = 0; j < nh; j++) a[j] = k_exp(ln10 * xi[j]);
        for (int64_t j = 0; j < nh; j++) b[j] = k_exp(ln10 * xi[nh + j]);
        for (int64_t j = 0; j < nh; j++) {
            float lv = xi[2 * nh + j];
            c[j] = copysignf((k_exp(ln10 * fabsf(lv)) - 1.0f) * 1e5f, lv);
        }
    }
}

/* Sort x (p, d, l) in place along d with a comparator network (ci[k] < cj[k]),
   vectorised over the l contiguous lanes; nan (p, l) is set to 1 where a lane of a
   block holds a NaN (its sorted values are then meaningless). */
void iris_sort_draws(int64_t p, int64_t d, int64_t l, float *x, int64_t n_cmp,
                     const int32_t *ci, const int32_t *cj, uint8_t *nan, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(dynamic) if(nt > 1 && p > 1)
    for (int64_t q = 0; q < p; q++) {
        float *xq = x + q * d * l;
        uint8_t *restrict flag = nan + q * l;
        memset(flag, 0, (size_t)l);
        for (int64_t i = 0; i < d; i++) {
            const float *restrict row = xq + i * l;
            for (int64_t j = 0; j < l; j++) flag[j] |= (uint8_t)(row[j] != row[j]);
        }
        for (int64_t k = 0; k < n_cmp; k++) {
            float *restrict a = xq + (int64_t)ci[k] * l;
            float *restrict b = xq + (int64_t)cj[k] * l;
            for (int64_t j = 0; j < l; j++) {
                float u = a[j], v = b[j];
                a[j] = u < v ? u : v;
                b[j] = u < v ? v : u;
            }
        }
    }
}
"""


def _cache_dir() -> Path:
    root = os.environ.get("IRIS_LAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "iris_lab"


def _compile_flags() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability()
    # -ffp-contract=fast: fused multiply-adds (ISO C mode would forbid them); they halve
    # the latency of the polynomial chains that bound the coupling kernel
    flags = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-std=c99",
             "-ffp-contract=fast"]
    if sys.platform.startswith("linux") or sys.platform == "darwin":
        import platform

        if platform.machine() in ("x86_64", "AMD64"):
            flags += ["-mavx2", "-mfma"] if cap in ("AVX2", "AVX512") else ["-msse4.1"]
    return flags


def load_kernels(*, compile_if_missing: bool = True) -> ctypes.CDLL | None:
    """The fused CPU kernels, compiled on first use; ``None`` without a C compiler.

    The shared library is cached under ``IRIS_LAB_CACHE`` (default
    ``~/.cache/iris_lab``), keyed by the source, the flags and the platform.

    Example
    -------
    >>> lib = load_kernels()
    >>> lib is None or hasattr(lib, "iris_coupling")
    True
    """
    if os.environ.get("IRIS_LAB_NO_KERNELS"):
        return None
    flags = _compile_flags()
    key = hashlib.sha256((_C_SOURCE + " ".join(flags) + sys.platform).encode()).hexdigest()[:16]
    path = _cache_dir() / f"inn_kernels_{key}.so"
    if not path.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compile_if_missing or cc is None:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src = Path(tmp) / "inn_kernels.c"
                src.write_text(_C_SOURCE)
                out = Path(tmp) / path.name
                # OpenMP on Linux: the library then shares torch's libgomp (same soname,
                # loaded once) and its thread pool; elsewhere single-threaded kernels
                omp = [["-fopenmp"], []] if sys.platform.startswith("linux") else [[]]
                for extra in omp:
                    res = subprocess.run([cc, *flags, *extra, str(src), "-o", str(out), "-lm"],
                                         capture_output=True, timeout=120)
                    if res.returncode == 0:
                        break
                else:
                    return None
                os.replace(out, path)  # atomic: concurrent builders agree
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    c_int = ctypes.c_int
    lib.iris_coupling.argtypes = [i64, i64, ptr, i64, ptr, i64, f32, f32, c_int, c_int]
    lib.iris_coupling_poly.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, f32, f32, c_int, c_int]
    lib.iris_bias_leaky.argtypes = [i64, i64, ptr, i64, ptr, f32, c_int]
    lib.iris_gather.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, c_int]
    lib.iris_sort_draws.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, c_int]
    lib.iris_x_to_cgs.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr, c_int]
    for f in (lib.iris_coupling, lib.iris_coupling_poly, lib.iris_bias_leaky, lib.iris_gather,
              lib.iris_sort_draws, lib.iris_x_to_cgs):
        f.restype = None
    lib.iris_inn_run.argtypes = [ptr, ctypes.c_int32, ptr, i64, ptr, i64, ptr, i64,
                                 ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, i64, ptr,
                                 c_int]
    lib.iris_inn_run.restype = c_int
    return lib


_SGEMM = ctypes.CFUNCTYPE(None, *([ctypes.c_char_p] * 2), *([ctypes.c_void_p] * 11))


@functools.lru_cache(maxsize=1)
def torch_sgemm() -> int | None:
    """Address of the Fortran-interface ``sgemm_`` of the BLAS that torch's CPU
    library carries (MKL in the Linux wheels), or ``None``.

    The whole-network driver of :class:`FrozenINN` calls it for its matrix
    products, so that they run on the same GEMM as ``torch.mm``. It is checked
    once on a small product against ``torch.mm`` (32-bit integer interface);
    ``IRIS_LAB_NO_SGEMM=1`` disables it.

    Example
    -------
    >>> ptr = torch_sgemm()
    >>> ptr is None or ptr > 0
    True
    """
    if os.environ.get("IRIS_LAB_NO_SGEMM") or not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        addr = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    # check: c (3, 2) = a (3, 4) @ b (4, 2) in row-major, as the driver calls it
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7.0
    w = torch.arange(8, dtype=torch.float32).reshape(2, 4) - 3.0  # (out, in) like Linear
    c = torch.zeros(3, 2)
    ints = [ctypes.c_int(v) for v in (2, 3, 4, 4, 4, 2)]  # m, n, k, lda, ldb, ldc
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    ref = ctypes.byref
    _SGEMM(addr)(b"T", b"N", ref(ints[0]), ref(ints[1]), ref(ints[2]), ref(one),
                 w.data_ptr(), ref(ints[3]), a.data_ptr(), ref(ints[4]), ref(zero),
                 c.data_ptr(), ref(ints[5]))
    return addr if torch.allclose(c, a @ w.t(), rtol=1e-5, atol=1e-5) else None


_MAX_LAYERS = 8


class _CSubnet(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("n_in", ctypes.c_int32 * _MAX_LAYERS),
                ("n_out", ctypes.c_int32 * _MAX_LAYERS), ("w", ctypes.c_void_p * _MAX_LAYERS),
                ("b", ctypes.c_void_p * _MAX_LAYERS)]


class _CIO(ctypes.Structure):
    _fields_ = [("y", ctypes.c_void_p), ("ldy", ctypes.c_int64), ("ny", ctypes.c_int64),
                ("n_draws", ctypes.c_int64), ("row0", ctypes.c_int64), ("nz", ctypes.c_int64),
                ("scale", ctypes.c_float), ("mean", ctypes.c_void_p), ("std", ctypes.c_void_p),
                ("n_out", ctypes.c_int64)]


class _CBlock(ctypes.Structure):
    _fields_ = [("split", ctypes.c_int32), ("poly", ctypes.c_int32), ("clamp", ctypes.c_float),
                ("slope", ctypes.c_float), ("coef", ctypes.c_float * 11),
                ("m1", ctypes.c_float), ("m2", ctypes.c_float), ("sub1", _CSubnet),
                ("sub2", _CSubnet), ("perm", ctypes.c_void_p), ("perm_inv", ctypes.c_void_p)]


#: Largest relative error of the fitted ``e^{C atan(r)}`` (float64) for which the
#: polynomial coupling kernel is used; float32 evaluation adds ~1e-7, as the
#: Cephes ``atan``/``exp`` pair does.
POLY_FIT_TOLERANCE = 5e-8


@functools.lru_cache(maxsize=16)
def coupling_polynomial(clamp: float) -> tuple[torch.Tensor, float, float] | None:
    """Coefficients of ``g(r) = e^{C atan(r)}``, ``C = 0.636 clamp``, on
    ``|r| ≤ tan(π/8)`` (degree 10, Chebyshev fit in float64 converted to powers of
    ``r``) and the factors ``e^{C π/4}``, ``e^{C π/2}``; ``None`` when the fit misses
    :data:`POLY_FIT_TOLERANCE` (large clamps: the Cephes kernel is used then).

    Example
    -------
    >>> c, m1, m2 = coupling_polynomial(2.0)
    >>> round(float(c[0]), 6), round(m2, 4)
    (1.0, 7.3747)
    """
    factor = ATAN_FACTOR * float(clamp)
    edge = math.tan(math.pi / 8)
    r = np.cos(np.linspace(0.0, np.pi, 4001)) * edge          # Chebyshev-dense nodes
    g = np.exp(factor * np.arctan(r))
    fit = np.polynomial.chebyshev.Chebyshev.fit(r, g, 10, domain=[-edge, edge])
    dense = np.linspace(-edge, edge, 100001)
    err = float(np.max(np.abs(fit(dense) / np.exp(factor * np.arctan(dense)) - 1.0)))
    if not err <= POLY_FIT_TOLERANCE:
        return None
    power = fit.convert(kind=np.polynomial.Polynomial, domain=[-edge, edge],
                        window=[-edge, edge]).coef
    coef = torch.tensor(np.pad(power, (0, 11 - power.size)), dtype=torch.float32)
    return coef, math.exp(factor * math.pi / 4), math.exp(factor * math.pi / 2)


# ----------------------------------------------------------------------------- network
@dataclasses.dataclass(frozen=True)
class _Subnet:
    weights: tuple[torch.Tensor, ...]  # (in, out) views of the Linear weights
    biases: tuple[torch.Tensor, ...]
    slope: float

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(w.shape[1] for w in self.weights)


@dataclasses.dataclass(frozen=True)
class _Coupling:
    split: int  # len of the first half
    subnet1: _Subnet  # reads the first half, updates the second
    subnet2: _Subnet  # reads the second half, updates the first
    clamp: float
    perm: torch.Tensor | None  # PermuteRandom after this block (forward gather)
    perm_inv: torch.Tensor | None


def _subnet_from(module: nn.Module) -> _Subnet:
    layers = list(module.children()) if isinstance(module, nn.Sequential) else [module]
    weights, biases, slope = [], [], None
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            if len(weights) > len(biases) or (i and not isinstance(layers[i - 1], nn.LeakyReLU)):
                raise TypeError("subnetworks must alternate Linear and LeakyReLU layers")
            weights.append(layer.weight.detach().float().t())
            biases.append(layer.bias.detach().float().contiguous() if layer.bias is not None
                          else torch.zeros(layer.out_features, device=layer.weight.device))
        elif isinstance(layer, nn.LeakyReLU):
            if slope is not None and layer.negative_slope != slope:
                raise TypeError("subnetwork leaky ReLUs must share one slope")
            slope = float(layer.negative_slope)
        else:
            raise TypeError(f"unsupported subnetwork layer {type(layer).__name__}")
    if not isinstance(layers[-1], nn.Linear):
        raise TypeError("subnetworks must end with a Linear layer")
    return _Subnet(tuple(weights), tuple(biases), 0.01 if slope is None else slope)


def _oddeven_merge_pairs(n: int) -> tuple[list[int], list[int]]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort of ``n`` items.

    Built for the next power of two; comparators reaching past ``n`` are
    dropped (the missing items act as +inf at the end and never move).

    Example
    -------
    >>> i, j = _oddeven_merge_pairs(4)
    >>> list(zip(i, j))
    [(0, 1), (2, 3), (0, 2), (1, 3), (1, 2)]
    """
    n2 = 1 << max(n - 1, 0).bit_length()
    ci: list[int] = []
    cj: list[int] = []
    p = 1
    while p < n2:
        k = p
        while k >= 1:
            for j in range(k % p, n2 - k, 2 * k):
                for i in range(min(k, n2 - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        ci.append(a)
                        cj.append(b)
            k //= 2
        p *= 2
    return ci, cj


@functools.lru_cache(maxsize=8)
def _comparators(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ci, cj = _oddeven_merge_pairs(n)
    return torch.tensor(ci, dtype=torch.int32), torch.tensor(cj, dtype=torch.int32)


class FrozenINN:
    """Inference-only evaluator of a FrEIA ``SequenceINN`` (GLOW couplings + permutations).

    Parameters
    ----------
    couplings
        The extracted blocks (use :meth:`from_sequence`).
    width
        Width of the network's input and output.
    chunk_rows
        Rows evaluated together; the buffers of one chunk should stay in the
        L2/L3 cache (default: ~6 MB of buffers per intra-op thread). On a
        machine where other jobs hold cores, larger chunks (fewer OpenMP
        barriers) are faster.
    use_kernels
        Use the fused C kernels on the CPU when they can be built (``True``);
        ``False`` runs plain torch operations (the reference fast path).
    polynomial
        With the kernels, evaluate ``e^{clamp · 0.636 atan(s)}`` of the couplings
        as one fitted polynomial after Cephes' argument reduction
        (:func:`coupling_polynomial`; ≈ 2× faster than ``atan`` then ``exp``, the
        same float32 accuracy); ``False``: the ``atan``/``exp`` kernel.
    driver
        With the kernels and torch's BLAS (:func:`torch_sgemm`), run the whole
        network in one C call per batch (default): the chunk loop, the matrix
        products and the element-wise steps without the interpreter in between,
        on chunks of ~2 MB of buffers (``chunk_rows`` default; 546 rows for the
        shipped network). ``False``: one torch/C call per step.

    Notes
    -----
    The weights are views of the source network's parameters (no copy): a
    later in-place change of the network's weights shows up here too, but a
    change of its permutations does not. Instances hold no mutable state
    (buffers are allocated per call), so concurrent calls are safe.

    Example
    -------
    ``fast = FrozenINN.from_sequence(inn.net_); x = fast.reverse(z)``
    """

    def __init__(self, couplings: list[_Coupling], width: int, *, chunk_rows: int | None = None,
                 use_kernels: bool = True, polynomial: bool = True,
                 driver: bool = True) -> None:
        self.couplings = tuple(couplings)
        self.width = int(width)
        hidden = max(max(c.subnet1.widths + c.subnet2.widths) for c in self.couplings)
        per_row = 4 * (3 * self.width + 2 * hidden)
        # ~6 MB of buffers per intra-op thread: in L2/L3 on an idle machine; fewer,
        # larger chunks also mean fewer OpenMP barriers, which dominate when another
        # job holds a core (then pass a larger chunk_rows, e.g. 16384)
        per_thread = (6 << 20) // per_row
        self.chunk_rows = int(chunk_rows or max(256, min(16384,
                                                         per_thread * torch.get_num_threads())))
        dev = self.couplings[0].subnet1.weights[0].device
        self.device = dev
        self._lib = load_kernels() if (use_kernels and dev.type == "cpu") else None
        self.polynomial = bool(polynomial)
        self._plan = self._driver_plan() if driver else None
        if self._plan is not None and chunk_rows is None:
            # the whole-network driver: ~2 MB of buffers per chunk (a few hundred rows),
            # enough rows for the matrix products to run at the large-GEMM rate
            self.chunk_rows = max(64, min(1024, (2 << 20) // (4 * (4 * self.width
                                                                    + 2 * hidden))))

    @property
    def batch_rows(self) -> int:
        """Rows worth passing per call: large for the whole-network driver, which
        chunks internally; one chunk otherwise."""
        return 4096 if self._plan is not None else self.chunk_rows

    @property
    def uses_driver(self) -> bool:
        """Whether one C call runs the whole network (BLAS through :func:`torch_sgemm`)."""
        return self._plan is not None

    def _driver_plan(self) -> tuple | None:
        """The block descriptions for ``iris_inn_run``, or ``None`` when the driver
        cannot run (no kernels, no BLAS pointer, more layers than it holds)."""
        if self._lib is None:
            return None
        gemm = torch_sgemm()
        if gemm is None:
            return None
        keep: list[torch.Tensor] = []
        blocks = (_CBlock * len(self.couplings))()

        def fill(dst: _CSubnet, sub: _Subnet) -> bool:
            if len(sub.weights) > _MAX_LAYERS:
                return False
            dst.n_layers = len(sub.weights)
            for i, (w, b) in enumerate(zip(sub.weights, sub.biases, strict=True)):
                wt = w.t().contiguous()  # (out, in): the Linear layer's own layout
                bc = b.contiguous()
                keep.extend((wt, bc))
                dst.n_in[i], dst.n_out[i] = wt.shape[1], wt.shape[0]
                dst.w[i], dst.b[i] = wt.data_ptr(), bc.data_ptr()
            return True

        for blk, c in zip(blocks, self.couplings, strict=True):
            blk.split, blk.clamp, blk.slope = c.split, c.clamp, c.subnet1.slope
            if c.subnet2.slope != c.subnet1.slope:
                return None
            poly = coupling_polynomial(c.clamp) if self.polynomial else None
            blk.poly = int(poly is not None)
            if poly is not None:
                blk.coef[:] = [float(v) for v in poly[0]]
                blk.m1, blk.m2 = poly[1], poly[2]
            if not (fill(blk.sub1, c.subnet1) and fill(blk.sub2, c.subnet2)):
                return None
            for name in ("perm", "perm_inv"):
                idx = getattr(c, name)
                if idx is not None:
                    idx = idx.to(torch.int64).contiguous()
                    keep.append(idx)
                    setattr(blk, name, idx.data_ptr())
        hid = max(max(c.subnet1.widths[:-1] + c.subnet2.widths[:-1] + (1,))
                  for c in self.couplings)
        return gemm, blocks, keep, hid

    @property
    def uses_kernels(self) -> bool:
        """Whether the fused C kernels run the element-wise work."""
        return self._lib is not None

    @classmethod
    def from_sequence(cls, net: nn.Module, **kwargs) -> FrozenINN:
        """Extract a FrEIA ``SequenceINN`` of ``GLOWCouplingBlock`` / ``PermuteRandom``.

        Raises
        ------
        TypeError
            For other module types, conditional blocks or clamp activations
            other than FrEIA's ``"ATAN"``.
        """
        from FrEIA.modules import GLOWCouplingBlock, PermuteRandom

        couplings: list[dict] = []
        width = None
        for m in net.module_list:
            if isinstance(m, GLOWCouplingBlock):
                if m.conditional or m.ndims != 1:
                    raise TypeError("only unconditional 1-D GLOW coupling blocks are supported")
                probe = torch.tensor([0.5, -3.0])
                if not torch.allclose(m.f_clamp(probe), ATAN_FACTOR * torch.atan(probe)):
                    raise TypeError("only the ATAN clamp activation is supported")
                width = m.split_len1 + m.split_len2
                couplings.append(dict(split=m.split_len1, subnet1=_subnet_from(m.subnet1),
                                      subnet2=_subnet_from(m.subnet2), clamp=float(m.clamp),
                                      perm=None, perm_inv=None))
            elif isinstance(m, PermuteRandom):
                if not couplings or couplings[-1]["perm"] is not None:
                    raise TypeError("a permutation must follow a coupling block")
                couplings[-1]["perm"] = m.perm.detach().clone()
                couplings[-1]["perm_inv"] = m.perm_inv.detach().clone()
            else:
                raise TypeError(f"unsupported module {type(m).__name__}")
        if not couplings:
            raise TypeError("the network has no coupling blocks")
        return cls([_Coupling(**c) for c in couplings], width, **kwargs)

    # ------------------------------------------------------------------ pieces
    def _subnet(self, sub: _Subnet, inp: torch.Tensor, bufs: list[torch.Tensor],
                out: torch.Tensor) -> torch.Tensor:
        lib = self._lib
        n = inp.shape[0]
        h = inp
        last = len(sub.weights) - 1
        for i, (w, b) in enumerate(zip(sub.weights, sub.biases, strict=True)):
            if i == last:
                torch.addmm(b, h, w, out=out)
                return out
            dst = bufs[i % 2][:n * w.shape[1]].view(n, w.shape[1])
            if lib is not None:
                torch.mm(h, w, out=dst)
                lib.iris_bias_leaky(n, dst.shape[1], dst.data_ptr(), dst.stride(0),
                                    b.data_ptr(), sub.slope, torch.get_num_threads())
            else:
                torch.addmm(b, h, w, out=dst)
                torch.nn.functional.leaky_relu_(dst, sub.slope)
            h = dst
        return out

    def _update(self, x: torch.Tensor, a: torch.Tensor, clamp: float, rev: bool) -> None:
        """x ← affine coupling of x with coefficients a = [s_raw | t] (in place)."""
        n, h = x.shape
        if self._lib is not None:
            poly = coupling_polynomial(clamp) if self.polynomial else None
            if poly is not None:
                coef, m1, m2 = poly
                self._lib.iris_coupling_poly(n, h, x.data_ptr(), x.stride(0), a.data_ptr(),
                                             a.stride(0), coef.data_ptr(), m1, m2, int(rev),
                                             torch.get_num_threads())
            else:
                self._lib.iris_coupling(n, h, x.data_ptr(), x.stride(0), a.data_ptr(),
                                        a.stride(0), ATAN_FACTOR, clamp, int(rev),
                                        torch.get_num_threads())
            return
        s, t = a[:, :h], a[:, h:]
        s.atan_().mul_(ATAN_FACTOR).mul_(-clamp if rev else clamp).exp_()
        if rev:
            x.sub_(t).mul_(s)
        else:
            x.mul_(s).add_(t)

    def _gather(self, src: torch.Tensor, dst: torch.Tensor, idx: torch.Tensor) -> None:
        if self._lib is not None:
            self._lib.iris_gather(src.shape[0], src.shape[1], src.data_ptr(), src.stride(0),
                                  dst.data_ptr(), dst.stride(0), idx.data_ptr(),
                                  torch.get_num_threads())
        else:
            torch.index_select(src, 1, idx, out=dst)

    def _run(self, x: torch.Tensor, out: torch.Tensor, rev: bool) -> None:
        n_rows = x.shape[0]
        cr = min(self.chunk_rows, max(n_rows, 1))
        dev, w = self.device, self.width
        hid = max(max(c.subnet1.widths[:-1] + c.subnet2.widths[:-1] + (1,))
                  for c in self.couplings)
        # flat buffers: every (n, k) view of them is contiguous
        bufs = [torch.empty(cr * hid, device=dev) for _ in range(2)]
        state = [torch.empty(cr, w, device=dev), torch.empty(cr, w, device=dev)]
        coef = torch.empty(cr * w, device=dev)
        order = reversed(self.couplings) if rev else self.couplings
        order = list(order)
        for s0 in range(0, n_rows, cr):
            n = min(cr, n_rows - s0)
            cur, other = state[0][:n], state[1][:n]
            cur.copy_(x[s0:s0 + n])
            for c in order:
                if rev and c.perm_inv is not None:
                    self._gather(cur, other, c.perm_inv)
                    cur, other = other, cur
                x1, x2 = cur[:, :c.split], cur[:, c.split:]
                a1 = coef[:n * 2 * x2.shape[1]].view(n, -1)
                a2 = coef[:n * 2 * c.split].view(n, -1)
                if rev:
                    self._update(x2, self._subnet(c.subnet1, x1, bufs, a1), c.clamp, rev=True)
                    self._update(x1, self._subnet(c.subnet2, x2, bufs, a2), c.clamp, rev=True)
                else:
                    self._update(x1, self._subnet(c.subnet2, x2, bufs, a2), c.clamp, rev=False)
                    self._update(x2, self._subnet(c.subnet1, x1, bufs, a1), c.clamp, rev=False)
                    if c.perm is not None:
                        self._gather(cur, other, c.perm)
                        cur, other = other, cur
            out[s0:s0 + n] = cur

    # ------------------------------------------------------------------ public
    def forward(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The network's forward pass ``x → [y, z, pad]`` of ``(n, width)`` rows.

        ``out`` may be ``x`` itself (in place).

        Example
        -------
        ``y = fast.forward(x)``
        """
        return self._call(x, out, rev=False)

    def reverse(self, z: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The network's inverse pass ``[y, z, pad] → x`` of ``(n, width)`` rows.

        ``out`` may be ``z`` itself (in place).

        Example
        -------
        ``x = fast.reverse(z)``
        """
        return self._call(z, out, rev=True)

    def reverse_latent(self, y: torch.Tensor, z: torch.Tensor, n_draws: int, *, scale: float,
                       mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor,
                       row0: int = 0) -> torch.Tensor:
        """Posterior draws in one call of the driver: row ``i`` of ``out`` is
        ``mean + std · reverse([y[(row0 + i) // n_draws], scale · z[i], 0…])[:n]``.

        Parameters
        ----------
        y
            ``(n_pixels, n_y)`` normalised profiles.
        z
            ``(rows, n_z)`` latent draws; ``n_y + n_z ≤ width``.
        n_draws
            Draws per pixel: consecutive rows of ``z`` share a pixel.
        scale
            Latent standard deviation.
        mean, std
            ``(n,)`` un-scaling of the first ``n`` outputs.
        out
            ``(rows, n)`` float32 with unit column stride, written in place.
        row0
            Index of the first row within the pixels' draws.

        Raises
        ------
        RuntimeError
            Without the driver (:attr:`uses_driver`); use :meth:`reverse`.

        Example
        -------
        ``fast.reverse_latent(y, z, 200, scale=1.0, mean=m, std=s, out=draws)``
        """
        if self._plan is None:
            raise RuntimeError("reverse_latent needs the whole-network driver")
        cpu = torch.device("cpu")
        y = y.to(cpu, torch.float32).contiguous()
        z = z.to(cpu, torch.float32)
        mean = mean.to(cpu, torch.float32).contiguous()
        std = std.to(cpu, torch.float32).contiguous()
        if y.ndim != 2 or z.ndim != 2 or mean.ndim != 1 or std.shape != mean.shape \
                or n_draws < 1 or row0 < 0:
            raise ValueError("inconsistent shapes for reverse_latent (y (pixels, n_y), "
                             "z (rows, n_z), mean/std (n,), n_draws ≥ 1, row0 ≥ 0)")
        ny, nz, n = y.shape[1], z.shape[1], mean.shape[0]
        if out.dtype != torch.float32 or out.device != cpu:
            raise ValueError("out must be a float32 CPU tensor")
        if ny + nz > self.width or n > self.width or out.shape != (z.shape[0], n) \
                or z.stride(1) != 1 or out.stride(1) != 1 \
                or (z.shape[0] and (row0 + z.shape[0] - 1) // n_draws >= y.shape[0]):
            raise ValueError("inconsistent shapes for reverse_latent")
        io = _CIO(y.data_ptr(), y.stride(0), ny, n_draws, row0, nz, float(scale),
                  mean.data_ptr(), std.data_ptr(), n)
        with torch.inference_mode():
            self._call_driver(z, out, True, io)
        return out

    def _call_driver(self, x: torch.Tensor, out: torch.Tensor, rev: bool,
                     io: _CIO | None) -> None:
        """``iris_inn_run`` over the rows of ``x`` into ``out`` (unit column strides)."""
        gemm, blocks, _, hid = self._plan
        rc = self._lib.iris_inn_run(gemm, len(blocks), ctypes.addressof(blocks), x.shape[0],
                                    x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
                                    self.width, hid, int(rev), self.chunk_rows,
                                    None if io is None else ctypes.byref(io),
                                    torch.get_num_threads())
        if rc != 0:
            raise MemoryError("the INN driver could not allocate its chunk buffers")

    def _call(self, x: torch.Tensor, out: torch.Tensor | None, rev: bool) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"expected (n, {self.width}) rows, got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if out is None:
            out = torch.empty_like(x)
        elif out.shape != x.shape or out.device != x.device:
            raise ValueError(f"out must be {tuple(x.shape)} on {x.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
        elif out.dtype != torch.float32:  # evaluate in float32, then convert
            return out.copy_(self._call(x, None, rev))
        with torch.inference_mode():
            if self._plan is not None and x.shape[0] > 0:
                self._drive(x, out, rev)
            else:
                self._run(x, out, rev)
        return out

    def _drive(self, x: torch.Tensor, out: torch.Tensor, rev: bool) -> None:
        if x.stride(1) != 1:
            x = x.contiguous()
        dst = out if out.stride(1) == 1 else torch.empty(out.shape, dtype=torch.float32)
        self._call_driver(x, dst, rev, None)
        if dst is not out:
            out.copy_(dst)


def draw_percentiles(draws: torch.Tensor, q: torch.Tensor, *,
                     lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Percentiles over the draws axis, as ``torch.quantile(draws, q, dim=1)``.

    Parameters
    ----------
    draws
        ``(n_pixels, n_draws, n_quantities)`` float32, contiguous; **sorted in
        place** along the draws axis when the C kernels are available.
    q
        Quantile levels in [0, 1] (float32).
    lib
        The kernels of :func:`load_kernels` (``None``: ``torch.sort``).

    Returns
    -------
    torch.Tensor
        ``(len(q), n_pixels, n_quantities)``; NaN where a pixel's draws of a
        quantity contain NaN (as ``torch.quantile``).

    Example
    -------
    >>> import torch
    >>> d = torch.randn(3, 50, 4)
    >>> ref = torch.quantile(d, torch.tensor([0.16, 0.5]), dim=1)
    >>> got = draw_percentiles(d.clone(), torch.tensor([0.16, 0.5]), lib=load_kernels())
    >>> bool(torch.allclose(got, ref))
    True
    """
    p, n, m = draws.shape
    if lib is not None and draws.device.type == "cpu" and draws.dtype == torch.float32 \
            and draws.is_contiguous():
        ti, tj = _comparators(n)
        nan = torch.empty(p, m, dtype=torch.uint8)
        lib.iris_sort_draws(p, n, m, draws.data_ptr(), len(ti), ti.data_ptr(), tj.data_ptr(),
                            nan.data_ptr(), torch.get_num_threads())
        nan = nan.bool()
        ordered = draws
    else:
        nan = torch.isnan(draws).any(dim=1)
        ordered = torch.sort(draws, dim=1).values
    q = q.to(draws.device, draws.dtype)
    ranks = q * (n - 1)
    below = ranks.long().clamp(0, n - 1)
    above = (below + 1).clamp(max=n - 1)
    weights = (ranks - below).reshape(-1, 1, 1)
    lo = ordered[:, below].permute(1, 0, 2)
    hi = ordered[:, above].permute(1, 0, 2)
    res = torch.lerp(lo, hi, weights)
    return res.masked_fill_(nan.unsqueeze(0), float("nan"))
