"""Slow on purpose, and says when it computed: shows whether requests overlap.

    y = 3 x

Its JVP sleeps 0.3 s; when `SLEEPY_LOG` names a file, every JVP appends a line
`start end` (`time.time()`) to it, so a test can see whether two JVPs ran at once.
"""

import os
import time
from typing import Any

import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]


def apply(inputs: InputSchema) -> OutputSchema:
    return OutputSchema(y=3 * np.asarray(inputs.x))  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    start = time.time()
    time.sleep(0.3)
    log = os.environ.get("SLEEPY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{start} {time.time()}\n")
    return {"y": 3 * np.asarray(tangent_vector["x"])}
