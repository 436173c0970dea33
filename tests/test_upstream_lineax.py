"""`_server/upstream_lineax.py`: the private names of lineax (and of equinox, through
`lx.RESULTS`) that `/linear_solve` uses are where it expects them, and when a release
moves one, the server says which, in words."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from tesseract_lx._server import create_app, upstream_lineax
from tesseract_lx._server.lean import BinaryRoutes

from helpers import EXAMPLES


def test_lineax_names_are_where_the_server_expects_them():
    """Fails, naming what moved, on a lineax (or equinox) release that no longer gives
    `lx.RESULTS` items by name, each with its integer code."""
    upstream_lineax.check_lineax()
    names = upstream_lineax.result_names()
    assert len(names) == len(lx.RESULTS)
    assert names[upstream_lineax.successful_code()] == "successful"
    for code, name in names.items():
        item = getattr(lx.RESULTS, name)
        assert int(np.asarray(upstream_lineax.result_code(item))) == code


def test_a_solve_answers_its_result_by_name():
    """The codes a jitted, vmapped solve returns name lineax's own results."""
    easy = lx.MatrixLinearOperator(jnp.eye(2))
    hard = lx.MatrixLinearOperator(jnp.array([[1.0, 1e3], [0.0, 1.0]]))

    @jax.jit
    def codes(b):
        def one(op, b, max_steps):
            solver = lx.GMRES(rtol=1e-10, atol=1e-10, max_steps=max_steps)
            sol = lx.linear_solve(op, b, solver, throw=False)
            return upstream_lineax.result_code(sol.result)

        return jax.vmap(lambda b: (one(easy, b, None), one(hard, b, 1)))(b)

    got = codes(np.ones((3, 2)))
    names = upstream_lineax.result_names()
    assert [names[int(c)] for c in np.asarray(got[0])] == ["successful"] * 3
    assert [names[int(c)] for c in np.asarray(got[1])] == ["max_steps_reached"] * 3


def _message(*problems: str) -> str:
    return (
        "tesseract_lx's server cannot name the outcome of a lineax solve with this "
        f"lineax (lineax {_version('lineax')}, equinox {_version('equinox')}): "
        + "; ".join(problems)
        + ". Update `tesseract_lx/_server/upstream_lineax.py` for this release."
    )


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def test_a_lineax_without_items_by_name_is_named(monkeypatch):
    monkeypatch.delattr(lx.RESULTS, "_name_to_item")
    with pytest.raises(RuntimeError) as info:
        upstream_lineax.check_lineax()
    assert str(info.value) == _message("`lineax.RESULTS._name_to_item` is gone")
    # `/linear_solve` solves nothing without it: its solver is not made.
    app = create_app(EXAMPLES / "bratu_numpy" / "tesseract_api.py")
    (middleware,) = [m for m in app.user_middleware if m.cls is BinaryRoutes]
    route = middleware.kwargs["routes"]["linear_solve"]  # pyright: ignore[reportIndexIssue]
    with pytest.raises(RuntimeError) as info:
        route.check(None)
    assert str(info.value) == _message("`lineax.RESULTS._name_to_item` is gone")


def test_a_lineax_without_integer_codes_is_named(monkeypatch):
    class Item:
        pass

    items = {"successful": Item(), "max_steps_reached": Item()}
    monkeypatch.setattr(lx.RESULTS, "_name_to_item", items)
    with pytest.raises(RuntimeError) as info:
        upstream_lineax.check_lineax()
    assert str(info.value) == _message(
        "`lineax.RESULTS.successful._value` is not an integer code"
    )


def test_a_lineax_without_successful_is_named(monkeypatch):
    items = {
        name: item
        for name, item in upstream_lineax._items().items()
        if name != "successful"
    }
    monkeypatch.setattr(lx.RESULTS, "_name_to_item", items)
    with pytest.raises(RuntimeError) as info:
        upstream_lineax.check_lineax()
    assert str(info.value) == _message(
        "`lineax.RESULTS._name_to_item` has no `successful`"
    )
