"""`tlx.progress`: the live line of a long solve, and `client.activity` under it."""

import io
import re

import jax
import jax.numpy as jnp
import lineax as lx
import pytest
import tesseract_lx as tlx
from rich.console import Console

from references import bratu_inputs


jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("transport", ["tlx"])
def test_progress_line_counts_what_was_sent(client):
    f = tlx.TesseractModule(client)
    inputs = bratu_inputs(4)
    f(inputs)
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="u", of="residual")
    # Earlier requests (before the block) are not the block's.
    solver = lx.GMRES(rtol=1e-10, atol=1e-10)
    jax.block_until_ready(lx.linear_solve(J, jnp.ones((4, 4)), solver).value)
    before = client.activity.snapshot()["endpoints"]["jacobian_vector_product"]
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    client.stats.clear()
    with tlx.progress(client, refresh=0.01, console=console):
        jax.block_until_ready(lx.linear_solve(J, 2 * jnp.ones((4, 4)), solver).value)
    sent = client.stats["jacobian_vector_product"]
    done, flying, seconds = client.activity.snapshot()["endpoints"][
        "jacobian_vector_product"
    ]
    assert sent > 1 and done - before[0] == sent and flying == 0
    assert seconds > before[2]
    # The last line drawn, without the terminal's control sequences.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).replace("\r", "\n")
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert last.startswith(f"requests {sent} (in flight 0)"), last
    assert f"jacobian_vector_product {sent} " in last and "MB out" in last

    # Not a terminal (a log, a test, CI): nothing is drawn.
    quiet = io.StringIO()
    with tlx.progress(client, console=Console(file=quiet, force_terminal=False)):
        f(inputs)
    assert quiet.getvalue() == ""
