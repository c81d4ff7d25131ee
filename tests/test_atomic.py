"""Tests of iris_lab.atomic: Kurucz reader, Landé factors, Zeeman patterns, damping."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch

from iris_lab.atomic import (
    LineList,
    air_to_vacuum,
    effective_lande,
    lande_ls,
    parse_term,
    vacuum_to_air,
)

GOOD_ROW = open(  # noqa: SIM115
    __file__.replace("tests/test_atomic.py", "iris_lab/data/lines_fe6301_6302.kurucz")
).read().splitlines()[0]


def test_shipped_4015_list_is_the_18_lines_of_the_window():
    lines = LineList.shipped("4015_4017")
    assert len(lines) == 18
    assert np.all((lines.wavelength_air > 4015.1) & (lines.wavelength_air < 4016.8))
    species = sorted(f"{e}{i}" for e, i in zip(lines.element, lines.ion, strict=True))
    expected = sorted(["Fe1"] * 7 + ["Co1"] * 2 + ["Co2", "Ti1", "Ti1", "V1", "Ni1", "Ni2",
                                                     "Mn1", "Nd2", "Ce2"])
    assert species == expected
    # lower level = the lower energy; Fe I 4015.139 Å has E_low = 34692.148 cm-1
    assert lines.e_low[0] == pytest.approx(34692.148 / 8065.543937)
    assert np.all(lines.e_up > lines.e_low)
    # upper energy consistent with the wavelength to < 0.05 Å (vacuum wavenumbers)
    lam_from_e = 12398.419843 / (lines.e_up - lines.e_low)
    np.testing.assert_allclose(lam_from_e, lines.wavelength_vacuum, atol=0.05)


def test_air_vacuum_edlen_against_published_wavelengths_and_round_trip():
    # NIST air/vacuum pairs: Na I D2 5889.950/5891.583, H I Hα 6562.79/6564.61,
    # Ca II 8542.09/8544.44 Å. Edlén (1966) reproduces them to ≤ 0.01 Å (the last digit).
    air = np.array([5889.950, 6562.79, 8542.09])
    np.testing.assert_allclose(air_to_vacuum(air), [5891.583, 6564.61, 8544.44], atol=0.01)
    grid = np.linspace(2100.0, 9000.0, 50)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(grid)), grid, atol=1e-8)
    # below 2000 Å wavelengths are vacuum by convention: unchanged
    assert float(air_to_vacuum(1500.0)) == 1500.0


def test_landé_factors_ls_and_effective():
    # textbook values: 5P2 → 11/6, 5D0 → undefined (0), 5P1 → 5/2; Fe I 6302.5 ḡ = 2.5
    assert float(lande_ls(2.0, 1.0, 2.0)) == pytest.approx(11.0 / 6.0)
    assert float(lande_ls(1.0, 1.0, 2.0)) == pytest.approx(2.5)
    assert float(lande_ls(0.0, 2.0, 2.0)) == 0.0
    assert float(effective_lande(2.5, 0.0, 1.0, 0.0)) == pytest.approx(2.5)
    assert parse_term("(4F)4p y5F") == (2.0, 3.0)
    assert parse_term("fd6s *4D") == (1.5, 2.0)
    assert parse_term("2Hsp3P 4I") == (1.5, 6.0)
    assert all(np.isnan(parse_term("s6d 3+[1+]")))
    assert all(np.isnan(parse_term("*")))
    lines = LineList.shipped("fe6301_6302")
    # Kurucz's listed values (1.835/1.503 and 2.487) vs the LS values 11/6, 3/2, 5/2:
    # ḡ = 1.667 and 2.5 in LS coupling; the listed Landé factors give 1.669 and 2.487
    np.testing.assert_allclose(lines.g_eff, [1.669, 2.487], atol=1e-3)


def test_ls_lande_from_labels_agrees_with_listed_values():
    # Where both exist, Kurucz's (intermediate-coupling) Landé factors of the low-lying
    # lower levels agree with the LS values derived from the labels to < 0.15 (median
    # 0.006); the highly excited upper levels (4d/5d configurations) deviate more (up to
    # 0.6, median 0.05), which is why listed values take precedence. A wrong term parse
    # (S and L swapped, wrong letter) gives median errors of order 0.3-1.
    lines = LineList.shipped("4015_4017")
    for which, med, worst in (("low", 0.02, 0.15), ("up", 0.1, 0.7)):
        s, l, j = (getattr(lines, f"{k}_{which}") for k in ("s", "l", "j"))
        g = getattr(lines, f"lande_{which}")
        ok = ~np.isnan(s) & (j > 0)
        assert ok.sum() >= 12
        diff = np.abs(lande_ls(j[ok], l[ok], s[ok]) - g[ok])
        assert np.median(diff) < med
        assert np.max(diff) < worst


def test_unknown_levels_fall_back_to_ls_or_unsplit():
    lines = LineList.shipped("4015_4017")
    nd = int(np.flatnonzero(lines.element == "Nd")[0])
    # Nd II: Landé absent in the list; lower 4F9/2 from its label, upper level "*" unknown
    assert lines.lande_low[nd] == pytest.approx(float(lande_ls(4.5, 3.0, 1.5)))
    assert np.isnan(lines.lande_up[nd])
    assert not lines.polarizable[nd] and lines.g_eff[nd] == 0.0
    assert "vdw:unsold*1.5" in lines.damping_source[nd]
    assert "rad:classical" in lines.damping_source[nd]


@pytest.mark.nlte
def test_zeeman_pattern_matches_lightweaver_ls_components():
    from lightweaver.rh_atoms import Fe23_atom
    from lightweaver.zeeman import compute_zeeman_components

    lines = LineList.shipped("fe6301_6302")
    # use the LS Landé factors, as Lightweaver derives them from Fe23's L, S, J
    lines = dataclasses.replace(
        lines,
        lande_low=lande_ls(lines.j_low, lines.l_low, lines.s_low),
        lande_up=lande_ls(lines.j_up, lines.l_up, lines.s_up),
    )
    ours = lines.zeeman_pattern()
    atom = Fe23_atom()
    lw_lines = sorted((ln for ln in atom.lines if 630.0 < ln.lambda0 < 630.5),
                      key=lambda ln: ln.lambda0)
    assert len(lw_lines) == 2
    for k, ln in enumerate(lw_lines):
        comp = compute_zeeman_components(ln)
        for alpha, name in ((-1, "sigma_b"), (0, "pi"), (1, "sigma_r")):
            sel = (comp.alpha == alpha) & (comp.strength > 0)  # LW keeps zero-strength ones
            m = ours[name]["mask"][k]
            # same components to round-off (both exact formulae)
            np.testing.assert_allclose(np.sort(ours[name]["shift"][k][m]),
                                       np.sort(comp.shift[sel]), atol=1e-12)
            order_ours = np.argsort(ours[name]["shift"][k][m])
            order_lw = np.argsort(comp.shift[sel])
            np.testing.assert_allclose(ours[name]["strength"][k][m][order_ours],
                                       comp.strength[sel][order_lw], atol=1e-12)


def test_zeeman_centre_of_gravity_is_g_eff():
    # Σ S_r·shift over σ_r equals ḡ for any J_l, J_u (Landi Degl'Innocenti & Landolfi
    # 2004, eq. 3.44), and the pattern is antisymmetric; strengths sum to 1 per group.
    lines = LineList.shipped("4015_4017")
    z = lines.zeeman_pattern()
    pol = lines.polarizable
    cog_r = (z["sigma_r"]["shift"] * z["sigma_r"]["strength"]).sum(1)
    cog_b = (z["sigma_b"]["shift"] * z["sigma_b"]["strength"]).sum(1)
    np.testing.assert_allclose(cog_r[pol], lines.g_eff[pol], atol=1e-12)
    np.testing.assert_allclose(cog_b[pol], -lines.g_eff[pol], atol=1e-12)
    for g in z.values():
        np.testing.assert_allclose(g["strength"].sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose((z["pi"]["shift"] * z["pi"]["strength"]).sum(1), 0.0,
                               atol=1e-12)
    # unknown lines: unsplit
    assert np.all(z["sigma_r"]["shift"][~pol] == 0.0)


def test_damping_unsold_equivalent_reproduces_listed_vdw_and_abo_scaling(tmp_path):
    lines = LineList.shipped("4015_4017")
    d = lines.damping(torch.tensor(1e4), torch.tensor(1.0), torch.tensor(1.0))
    listed = ~np.isnan(lines.log_gamma_vdw) & np.isnan(lines.abo_sigma)
    # Kurucz's log Γ_vdW/n_H is at 10⁴ K: our Unsöld × enhancement must reproduce it there
    np.testing.assert_allclose(np.log10(d["vdw"].numpy()[listed]),
                               lines.log_gamma_vdw[listed], atol=1e-10)
    np.testing.assert_allclose(np.log10(d["rad"].numpy()), lines.log_gamma_rad, atol=1e-12)
    # an ABO-packed row (σ = 284 a0², α = 0.261 in the vdW column, as RH reads it)
    row = GOOD_ROW[:91] + "  284.261" + GOOD_ROW[100:]
    path = tmp_path / "abo.kurucz"
    path.write_text(row + "\n")
    abo = LineList.from_kurucz(path)
    assert abo.abo_sigma[0] == 284 and abo.abo_alpha[0] == pytest.approx(0.261)
    assert "vdw:abo" in abo.damping_source[0]
    t = torch.tensor([5000.0, 10000.0], dtype=torch.float64)
    w = abo.damping(t, torch.ones(2), torch.ones(2))["vdw"][:, 0]
    # Anstee & O'Mara: Γ ∝ v̄^(1-α) ∝ T^((1-α)/2) (analytic)
    assert float(w[1] / w[0]) == pytest.approx(2.0 ** ((1 - 0.261) / 2), rel=1e-12)
    # magnitude: Fe I-H, σ = 284 a0² gives Γ/n_H ≈ 2e-8 s⁻¹ cm³ at 10⁴ K (order check
    # against the list's 10^-7.54 = 2.9e-8 for the same line)
    assert 1e-8 < float(w[1]) < 5e-8


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r[:10] + " -0.7x1" + r[17:], "log_gf"),
        (lambda r: r[:17] + " 26.X0" + r[23:], "species code"),
        (lambda r: r[:60], "too short"),
        (lambda r: r[:35] + "  2.3" + r[40:], "J first level"),
        (lambda r: r[:143] + " 1x03" + r[148:], "Landé"),
    ],
)
def test_malformed_row_raises_naming_row_and_field(tmp_path, mutate, field):
    path = tmp_path / "bad.kurucz"
    path.write_text("# comment\n" + GOOD_ROW + "\n" + mutate(GOOD_ROW) + "\n")
    with pytest.raises(ValueError, match="row 3") as err:
        LineList.from_kurucz(path)
    assert field in str(err.value)


def test_reader_errors_and_select(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LineList.from_kurucz(tmp_path / "missing.kurucz")
    empty = tmp_path / "empty.kurucz"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no lines"):
        LineList.from_kurucz(empty)
    with pytest.raises(ValueError, match="unknown line list"):
        LineList.shipped("nope")
    lines = LineList.shipped("4015_4017")
    sub = lines.select(lines.element == "Fe")
    assert len(sub) == 7 and set(sub.element) == {"Fe"}
    assert Fraction(float(sub.j_low[0])).denominator in (1, 2)
