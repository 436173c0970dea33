"""The `numpy_loop` test Tesseract, serving only `apply` and `jacobian_vector_product`
(no VJP): the server's `/linear_solve` has no transpose for LSMR or `Normal`."""

import importlib.util
from pathlib import Path


_path = Path(__file__).parents[1] / "numpy_loop" / "tesseract_api.py"
_spec = importlib.util.spec_from_file_location("_tesseract_lx_numpy_jvp_only", _path)
assert _spec is not None and _spec.loader is not None
_numpy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_numpy)

InputSchema = _numpy.InputSchema
OutputSchema = _numpy.OutputSchema
apply = _numpy.apply
jacobian_vector_product = _numpy.jacobian_vector_product
