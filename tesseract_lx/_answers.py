"""What comes back: answers taken apart, checked for shape, dtype and finiteness.

Every answer passes `check_finite` on its way back: a call made with
`check_finite=True` refuses NaN and Inf there, naming the endpoint and the path.
A malformed answer (an output missing, a wrong shape) is a `TesseractServerError`
naming the endpoint and the path, never a decoder's traceback.
"""

from typing import Any

import numpy as np

from ._call import Call, check_static
from ._dtypes import conform
from ._errors import TesseractNonFiniteError, TesseractServerError
from ._tree import Leaf
from ._wire import paths


def size(arrays) -> int:
    """Elements of a point: what measured latencies are keyed by."""
    return int(sum(np.size(a) for a in arrays))


def malformed(call: Call, endpoint: str, message: str) -> TesseractServerError:
    client = call.client
    error = TesseractServerError(endpoint, 200, message, ", ".join(client.urls))
    client.telemetry.record_error(error)
    return error


def check_finite(
    call: Call,
    endpoint: str,
    path: str,
    value: Any,
    k: int | None = None,
    wrt: str | None = None,
) -> None:
    """Refuse NaN and Inf in the answer at `path`, if the call asks to.

    `k`: the answer stacks K items along its first axis (a batch). `wrt`: the
    input a `/jacobian` block is the derivative with respect to.
    """
    if not call.check_finite:
        return
    value = np.asarray(value)
    if value.dtype.kind not in "fc":
        return
    finite = np.isfinite(value)
    if finite.all():
        return
    bad = value[~finite]
    what = " and ".join(
        name
        for name, found in (("NaN", np.isnan(bad).any()), ("Inf", np.isinf(bad).any()))
        if found
    )
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    where = []
    if k is not None and k > 1:
        where.append(f"item {first[0]} of the batch of {k}")
    index = first[1:] if k is not None else first
    if index:
        where.append(f"index {index}")
    at = f", the first at {', '.join(where)}" if where else ""
    client = call.client
    error = TesseractNonFiniteError(
        endpoint,
        None,
        f"the answer holds {what} at `{path}`"
        + (f" with respect to `{wrt}`" if wrt else "")
        + f" ({bad.size} of {value.size} "
        f"value{'s' if value.size > 1 else ''}{at}); `check_finite=True` refuses NaN "
        "and Inf in answers.",
        ", ".join(client.urls),
    )
    client.telemetry.record_error(error)
    raise error


def answer_at(call: Call, response: Any, leaf: Leaf, endpoint: str) -> np.ndarray:
    """The output `leaf` of an `/apply` answer, in the dtype it expects."""
    try:
        value = paths.get(response, leaf.path)
    except (KeyError, IndexError, TypeError):
        raise malformed(
            call,
            endpoint,
            f"the answer has no output `{leaf.path}`, which the output structure "
            "(from the schema or `/abstract_eval`) promised",
        ) from None
    return conform(value, leaf.dtype, leaf.path, endpoint)


def outputs_of(call: Call, response: Any, endpoint: str) -> list[np.ndarray]:
    """The call's output leaves out of an `/apply` answer, checked."""
    outs = []
    for leaf in call.outputs:
        value = answer_at(call, response, leaf, endpoint)
        if value.shape != leaf.shape:
            raise malformed(
                call,
                endpoint,
                f"the answer has `{leaf.path}` with shape {value.shape}, but "
                f"{leaf.shape} was expected (from the schema or `/abstract_eval`)",
            )
        check_finite(call, endpoint, leaf.path, value)
        outs.append(value)
    check_static(call, response)
    return outs


def array_at(call: Call, answer: Any, path: str, endpoint: str, shape) -> np.ndarray:
    """The array at `path` of a derivative's answer, of shape `shape`."""
    try:
        value = np.asarray(answer[path])
    except (KeyError, TypeError):
        raise malformed(
            call, endpoint, f"the answer has no `{path}`, which was asked for"
        ) from None
    if value.shape != tuple(shape):
        raise malformed(
            call,
            endpoint,
            f"the answer has `{path}` with shape {value.shape}; {tuple(shape)} was "
            "expected",
        )
    return value
