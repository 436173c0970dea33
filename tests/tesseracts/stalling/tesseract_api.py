"""Sleeps when asked, and says who it is and when it computed: for fault tests.

    y = x**3 + x - b

Every endpoint first sleeps `delay` seconds (an input, 0 by default), so a test can
make a request outlast a read timeout, or kill the server while it computes. When
`STALLING_PID` names a file, the server process writes its pid there on import (a
test kills the server through it); when `STALLING_LOG` names a file, every call
appends its endpoint there before sleeping (a test knows a solve is under way).
"""

import os
import time
from typing import Any

import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


if os.environ.get("STALLING_PID"):
    with open(os.environ["STALLING_PID"], "w") as f:
        f.write(str(os.getpid()))


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]
    b: Array[(None,), Float64]
    delay: float = 0.0


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]


def _stall(endpoint: str, inputs: InputSchema) -> np.ndarray:
    log = os.environ.get("STALLING_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{endpoint}\n")
    time.sleep(inputs.delay)
    return np.asarray(inputs.x)


def apply(inputs: InputSchema) -> OutputSchema:
    x = _stall("apply", inputs)
    return OutputSchema(y=x**3 + x - np.asarray(inputs.b))  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    x = _stall("jacobian_vector_product", inputs)
    return {"y": (3 * x**2 + 1) * np.asarray(tangent_vector["x"])}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    x = _stall("vector_jacobian_product", inputs)
    return {"x": (3 * x**2 + 1) * np.asarray(cotangent_vector["y"])}
