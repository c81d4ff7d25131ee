"""Representative profiles (k-means) and the RP path of the IRIS² look-up."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from iris_lab.methods.iris2 import INTENSITY_UNITS, IRIS2, toy_database
from iris_lab.methods.rp import RepresentativeProfiles, invert_representative_profiles


@pytest.fixture(scope="module")
def families():
    """A 30 x 20 raster made of 5 database profiles with 1% noise; the truth labels."""
    db = toy_database(400, seed=2)
    rng = np.random.default_rng(0)
    chosen = np.array([3, 50, 120, 260, 399])
    truth = rng.integers(0, 5, (30, 20))
    clean = db.profile.values[chosen][truth]
    noisy = clean * (1.0 + rng.normal(0.0, 0.01, clean.shape))
    raster = xr.DataArray(noisy.astype(np.float32), dims=("y", "x", "wavelength"),
                          coords={"wavelength": db.wavelength.values},
                          attrs={"units": INTENSITY_UNITS})
    return db, chosen, truth, raster


def test_default_is_sixty_profiles():
    assert RepresentativeProfiles().n_profiles == 60


def test_kmeans_recovers_families_centres_and_spread(families):
    from sklearn.metrics import adjusted_rand_score

    db, chosen, truth, raster = families
    rp = RepresentativeProfiles(n_profiles=5, random_state=1).fit(raster)
    labels = rp.labels_.values
    assert adjusted_rand_score(truth.ravel(), labels.ravel()) == 1.0
    assert rp.counts_.sum() == truth.size
    flat = raster.values.reshape(-1, raster.sizes["wavelength"]).astype(np.float64)
    for k in range(5):
        members = flat[labels.ravel() == k]
        # a k-means fixed point: each centre is the mean of its members
        # (float32 centres: 1e-5 relative)
        np.testing.assert_allclose(rp.profiles_.values[k], members.mean(0), rtol=1e-5)
        # spread = member std; with 1% noise it is 1% of the centre (±15%: ~100
        # members per RP give a ~7% sampling error on a std)
        ratio = np.median(rp.spread_.values[k] / rp.profiles_.values[k])
        assert 0.0085 < ratio < 0.0115


def test_predict_masks_and_partial_pixels(families):
    db, chosen, truth, raster = families
    rp = RepresentativeProfiles(n_profiles=5, random_state=1).fit(raster)
    r = raster.copy()
    r[0, 0, :] = np.nan
    r[0, 1, 100:150] = np.nan
    lab = rp.predict(r)
    assert lab.values[0, 0] == -1
    assert lab.values[0, 1] == rp.labels_.values[0, 1]
    np.testing.assert_array_equal(lab.values[1:], rp.labels_.values[1:])
    with pytest.raises(ValueError, match="wavelengths differ"):
        rp.predict(raster.isel(wavelength=slice(0, 100)))


def test_save_load_round_trip(families, tmp_path):
    db, chosen, truth, raster = families
    rp = RepresentativeProfiles(n_profiles=5, random_state=1).fit(raster)
    back = RepresentativeProfiles.load(rp.save(tmp_path / "rp.nc"))
    xr.testing.assert_identical(back.profiles_, rp.profiles_)
    xr.testing.assert_identical(back.predict(raster), rp.labels_)
    bad = tmp_path / "bad.nc"
    bad.write_text("nope")
    with pytest.raises(ValueError, match="not a saved RepresentativeProfiles"):
        RepresentativeProfiles.load(bad)


def test_too_few_profiles_is_a_clear_error(families):
    raster = families[3]
    with pytest.raises(ValueError, match="cannot make"):
        RepresentativeProfiles(n_profiles=60).fit(raster.isel(y=slice(0, 2), x=slice(0, 5)))


def test_rp_path_maps_database_matches_to_pixels(families):
    db, chosen, truth, raster = families
    model = IRIS2().fit(db)
    rp = RepresentativeProfiles(n_profiles=5, random_state=1).fit(raster)
    res = invert_representative_profiles(model, rp, raster)
    assert res.attrs["method"] == "rp_lookup"
    # each RP is the mean of 1%-noise copies of one entry: the look-up finds that entry
    np.testing.assert_array_equal(res["index"].values, chosen[truth])
    direct = model.predict(raster)
    # per pixel the RP answer is at best as good as the pixel's own look-up
    assert (res["chi2"].values >= direct["chi2"].values * (1 - 1e-5)).all()
    np.testing.assert_array_equal(res["rp_index"].values, rp.labels_.values)
    np.testing.assert_array_equal(res["temperature"].values,
                                  db.temperature.values[chosen[truth]])


def test_reduced_space_kmeans_matches_full_space_on_separated_families(families):
    from sklearn.metrics import adjusted_rand_score

    db, chosen, truth, raster = families
    ours = RepresentativeProfiles(n_profiles=5, random_state=1, init_rows=100).fit(raster)
    full = RepresentativeProfiles(n_profiles=5, random_state=1, variance=None,
                                  init_rows=None, max_iter=100).fit(raster)
    assert ours.n_dims_ < raster.sizes["wavelength"] and full.n_dims_ == 473
    assert adjusted_rand_score(full.labels_.values.ravel(), ours.labels_.values.ravel()) == 1.0
    np.testing.assert_allclose(ours.inertia_, full.inertia_, rtol=1e-9)
    # full-space Lloyd refinement reaches a fixed point: labels = nearest centre
    refined = RepresentativeProfiles(n_profiles=5, random_state=1, refine_iter=5).fit(raster)
    np.testing.assert_array_equal(refined.predict(raster).values, refined.labels_.values)
    assert refined.n_refine_ >= 1


def test_nearest_centre_is_exact_with_ties():
    from iris_lab.methods.rp import _nearest
    from iris_lab.methods.search import brute_force_nearest

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(12, 473)) * 10 + 100
    centres[5] = centres[2]                       # duplicate centre: tie → lower index
    data = (centres[rng.integers(0, 12, 500)] + rng.normal(size=(500, 473))).astype(np.float32)
    data[:3] = centres[[2, 5, 7]]                 # exactly on centres
    got = _nearest(data, centres)
    ref = brute_force_nearest(data.astype(np.float64), centres, np.ones(473))[0]
    np.testing.assert_array_equal(got, ref)
    assert got[0] == 2 and got[1] == 2 and (got != 5).all()
