import math

import pytest

from sparsekern.methods import er_densities, erk_densities, layer_densities, uniform_densities

SHAPES = [(2048, 784), (2048, 2048), (10, 2048)]


def _stored(densities, shapes):
    return sum(d * math.prod(s) for d, s in zip(densities, shapes))


@pytest.mark.parametrize("density", [0.02, 0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("shapes", [SHAPES, [(64, 3, 3, 3), (128, 64, 3, 3), (10, 512)]], ids=["mlp", "conv"])
def test_erk_hits_the_budget(shapes, density):
    d = erk_densities(shapes, density)
    assert all(0.0 <= x <= 1.0 for x in d)
    assert _stored(d, shapes) == pytest.approx(density * sum(math.prod(s) for s in shapes), rel=1e-9)


def test_erk_exact_small_case():
    # raw densities 2/4=0.5 and 200/10000=0.02; the 2x2 layer would pass 1 and becomes dense.
    d = erk_densities([(2, 2), (100, 100)], 0.5)
    assert d[0] == 1.0
    assert d[1] == pytest.approx((0.5 * 10004 - 4) / 10000)


def test_erk_ratio_follows_formula():
    shapes = [(100, 50), (200, 300)]
    d = erk_densities(shapes, 0.05)
    ratio = (150 / 5000) / (500 / 60000)
    assert d[0] / d[1] == pytest.approx(ratio)


def test_erk_clamps_dense_layers_and_keeps_budget():
    shapes = [(64, 32), (256, 256), (10, 256)]
    d = erk_densities(shapes, 0.1, dense_layers=[0])
    assert d[0] == 1.0 and d[1] < 0.1
    assert _stored(d, shapes) == pytest.approx(0.1 * sum(math.prod(s) for s in shapes))


def test_power_scale_zero_is_uniform():
    d = erk_densities([(100, 50), (200, 300)], 0.3, power_scale=0.0)
    assert d == pytest.approx([0.3, 0.3])


def test_er_ignores_kernel_dims():
    shapes = [(16, 8, 3, 3), (16, 8, 5, 5)]
    d = er_densities(shapes, 0.2)
    assert d[0] == pytest.approx(d[1])
    assert erk_densities(shapes, 0.2)[0] > erk_densities(shapes, 0.2)[1]


def test_density_extremes():
    assert erk_densities(SHAPES, 1.0) == pytest.approx([1.0, 1.0, 1.0])
    assert erk_densities(SHAPES, 0.0) == [0.0, 0.0, 0.0]


def test_uniform_and_dispatch():
    assert uniform_densities(SHAPES, 0.1, dense_layers=[2]) == [0.1, 0.1, 1.0]
    assert layer_densities(SHAPES, 0.1, "erk") == erk_densities(SHAPES, 0.1)
    with pytest.raises(ValueError, match="unknown density allocation"):
        layer_densities(SHAPES, 0.1, "bogus")


@pytest.mark.parametrize("kwargs,match", [
    (dict(shapes=[(4,)], density=0.1), "shapes"),
    (dict(shapes=SHAPES, density=1.5), "density"),
    (dict(shapes=SHAPES, density=0.1, dense_layers=[3]), "dense_layers"),
    (dict(shapes=[(1000, 1000), (10, 10)], density=0.00001, dense_layers=[1]), "too low"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        erk_densities(**kwargs)
