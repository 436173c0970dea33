"""The chain of springs (`../springs`), with a JVP that checks its point in NumPy:
it refuses a non-finite `x` by looking at the values, as simulators that validate
their inputs do. It runs eagerly but not under `jax.jit`: a server that traces the
Tesseract into a compiled solve must notice and call it instead.
"""

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from tesseract_core.runtime.jax_recipes import jax_jvp


_spec = importlib.util.spec_from_file_location(
    "springs_for_checked", Path(__file__).parent.parent / "springs" / "tesseract_api.py"
)
assert _spec is not None and _spec.loader is not None
springs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(springs)

InputSchema = springs.InputSchema
OutputSchema = springs.OutputSchema
apply = springs.apply
jacobian = springs.jacobian
vector_jacobian_product = springs.vector_jacobian_product


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    if not np.all(np.isfinite(np.asarray(inputs.x))):
        raise ValueError("x must be finite")
    return jax_jvp(springs.apply_jit, inputs, jvp_inputs, jvp_outputs, tangent_vector)
