"""The `bratu` example Tesseract, serving only `apply`, `jacobian` and `abstract_eval`
(no `jacobian_vector_product`, no `vector_jacobian_product`)."""

import importlib.util
from pathlib import Path


_path = (
    Path(__file__).parents[3] / "examples" / "tesseracts" / "bratu" / "tesseract_api.py"
)
_spec = importlib.util.spec_from_file_location(
    "_tesseract_lx_bratu_jacobian_only", _path
)
assert _spec is not None and _spec.loader is not None
_bratu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bratu)

InputSchema = _bratu.InputSchema
OutputSchema = _bratu.OutputSchema
apply = _bratu.apply
jacobian = _bratu.jacobian
abstract_eval = _bratu.abstract_eval
