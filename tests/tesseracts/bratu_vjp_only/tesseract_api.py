"""The `bratu` example Tesseract, serving only `apply`, `vector_jacobian_product` and
`abstract_eval` (no `jacobian`, no `jacobian_vector_product`)."""

import importlib.util
from pathlib import Path


_path = (
    Path(__file__).parents[3] / "examples" / "tesseracts" / "bratu" / "tesseract_api.py"
)
_spec = importlib.util.spec_from_file_location("_tesseract_lx_bratu_vjp_only", _path)
assert _spec is not None and _spec.loader is not None
_bratu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bratu)

InputSchema = _bratu.InputSchema
OutputSchema = _bratu.OutputSchema
apply = _bratu.apply
vector_jacobian_product = _bratu.vector_jacobian_product
abstract_eval = _bratu.abstract_eval
