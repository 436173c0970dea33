"""Output structure (tree, shapes, dtypes) of a call, for tracing.

JAX must know what a call returns before it is sent. In this order, and at most one
request per input signature, ever:

1. the schema, when it fixes every output (`_tree.fixed_outputs`): nothing is sent;
2. what an eager `/apply` with the same signature returned (`learn`);
3. one `/abstract_eval` (some upstream Tesseracts have a broken one: then the error
   says to call eagerly first).

A signature is the input template (structure and static values) and the operands'
shapes and dtypes, never their values.
"""

from typing import Any

from ._tree import abstract, build, fixed_outputs, flatten_outputs, Leaf, Template
from ._wire.spec import ABSTRACT_EVAL


Structure = tuple[Template, tuple[Leaf, ...]]


def learn(client: Any, template: Template, leaves: tuple[Leaf, ...], found: Structure):
    """Remember the output structure an eager call showed for this signature."""
    client.telemetry.learn_structure((template, leaves), found)


def outputs(client: Any, template: Template, leaves: tuple[Leaf, ...]) -> Structure:
    found = client.telemetry.structure((template, leaves))
    if found is not None:
        return found
    schema = client.schema
    fixed = fixed_outputs(schema.outputs)
    if fixed is not None:
        found = (fixed[0], tuple(fixed[1]))
    else:
        if not schema.has(ABSTRACT_EVAL):
            raise ValueError(
                "Cannot trace this Tesseract call: its output shapes are not fixed by "
                "its schema and it has no `/abstract_eval`. Call it once eagerly "
                "(outside `jax.jit`) with inputs of the same shapes first."
            )
        payload = {"inputs": build(template, abstract(list(leaves)), wire=True)}
        try:
            result = client.request(ABSTRACT_EVAL, payload)
        except Exception as e:
            e.add_note(
                "`/abstract_eval` was asked for the output shapes under tracing; "
                "calling the Tesseract once eagerly with inputs of the same shapes "
                "first avoids it."
            )
            raise
        out_template, out_leaves, _ = flatten_outputs(schema.outputs, result)
        found = (out_template, tuple(out_leaves))
    learn(client, template, leaves, found)
    return found
