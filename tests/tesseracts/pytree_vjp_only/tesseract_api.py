"""The `pytree` example Tesseract, serving only `apply`, `vector_jacobian_product` and
`abstract_eval`: its JVPs come from VJPs, also between 0-d arrays (`params.b` to
`stats.mean`)."""

import importlib.util
from pathlib import Path


_path = (
    Path(__file__).parents[3]
    / "examples"
    / "tesseracts"
    / "pytree"
    / "tesseract_api.py"
)
_spec = importlib.util.spec_from_file_location("_tesseract_lx_pytree_vjp_only", _path)
assert _spec is not None and _spec.loader is not None
_pytree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pytree)

InputSchema = _pytree.InputSchema
OutputSchema = _pytree.OutputSchema
apply = _pytree.apply
vector_jacobian_product = _pytree.vector_jacobian_product
abstract_eval = _pytree.abstract_eval
