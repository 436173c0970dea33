"""tesseract-core's own example Tesseracts, from its sdist, with pure-JAX references.

These are Tesseracts we did not write: testing against them shows that `tesseract_lx`
follows tesseract-core's schemas as they are, not as our own examples happen to use
them. Their code is not copied into this repository: `download_examples` fetches the
sdist of the installed tesseract-core from the package index and extracts its
`examples/` into a temporary directory.

For each example, `EXAMPLES[name]` says how to make inputs (plain containers, as the
schema says), a reference of `apply` written again in JAX (its derivatives are JAX's
derivatives of it), which inputs and outputs are differentiable, which derivative
endpoints the Tesseract serves, and, for those that cannot run on this machine, why.
"""

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


JAC, JVP, VJP = "jacobian", "jacobian_vector_product", "vector_jacobian_product"
ALL_DERIVATIVES = frozenset({JAC, JVP, VJP})


#
# The sdist
#


def tesseract_core_version() -> str:
    return importlib.metadata.version("tesseract-core")


def download_examples(
    dest: Path, *, version: str | None = None, timeout: float = 300.0
) -> Path:
    """Fetch tesseract-core's sdist and extract its `examples/` under `dest`.

    **Arguments:**

    - `dest`: an (empty) temporary directory; nothing is written outside it.
    - `version`: the tesseract-core release; by default the installed one.
    - `timeout`: seconds for the whole download before giving up.

    **Returns:** the folder holding one sub-folder per example.

    Raises `RuntimeError`, with pip's own message, when the index cannot be reached.
    """
    version = version or tesseract_core_version()
    dest = Path(dest)
    sdist_dir = dest / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(sdist_dir),
        # pip's own defaults (180 s per connection, 5 retries) would hang for many
        # minutes on an unreachable index; the command line wins over PIP_* variables.
        "--timeout",
        "30",
        "--retries",
        "1",
        "--disable-pip-version-check",
        f"tesseract-core=={version}",
    ]
    # pip's own scratch space too, so that a download killed on timeout leaves
    # nothing behind outside `dest`.
    scratch = dest / "tmp"
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch))
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=dest,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"Downloading the sdist of `tesseract-core=={version}` took longer than "
            f"{timeout:.0f} s: is the package index reachable? Command: "
            f"{' '.join(cmd)}"
        ) from None
    sdists = sorted(sdist_dir.glob("tesseract_core-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise RuntimeError(
            f"Could not download the sdist of `tesseract-core=={version}` (pip "
            f"exited with {proc.returncode}); the upstream examples need the "
            f"package index. pip said:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    out = dest / "examples"
    with tarfile.open(sdists[0]) as tar:
        prefix = f"{tar.getmembers()[0].name.split('/')[0]}/examples/"
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and (member.isfile() or member.isdir()):
                member.name = member.name[len(prefix) :]
                if member.name:
                    members.append(member)
        if not members:
            raise RuntimeError(f"{sdists[0].name} has no `examples/` folder.")
        # The "data" filter (no absolute paths, links or devices) where Python has it.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(out, members=members, filter="data")
        else:
            tar.extractall(out, members=members)
    return out


#
# Paths into nested inputs and outputs (tesseract-core's syntax: `a.v`, `data.[0]`)
#


def _key(part: str) -> str | int:
    if re.fullmatch(r"\[\d+\]", part):
        return int(part[1:-1])
    if re.fullmatch(r"\{.*\}", part):
        return part[1:-1]
    return part


def get_path(tree: Any, path: str) -> Any:
    for part in path.split("."):
        tree = tree[_key(part)]
    return tree


def set_path(tree: Any, path: str, value: Any) -> Any:
    """A copy of `tree` with `value` at `path`; the containers on the way are copied."""
    head, _, rest = path.partition(".")
    key = _key(head)
    leaf = set_path(tree[key], rest, value) if rest else value
    new: Any = list(tree) if isinstance(tree, list | tuple) else dict(tree)
    new[key] = leaf
    return new


def select(tree: Any, paths: tuple[str, ...]) -> dict[str, Any]:
    """The leaves at `paths`, as a flat dict keyed by path."""
    return {p: get_path(tree, p) for p in paths}


#
# The examples
#


@dataclasses.dataclass(frozen=True)
class BadInput:
    """Inputs the schema rules out, and the field an error must name (a regex)."""

    what: str
    change: Callable[[dict], dict]
    field: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One of tesseract-core's examples.

    - `name`: its folder under `examples/`.
    - `make_inputs`: the example's folder -> valid inputs, as plain containers.
    - `ref`: a pure-JAX `apply` of those inputs, outputs as tesseract_lx returns them.
    - `wrt`, `of`: the differentiable input and output paths the tests differentiate.
    - `endpoints`: the derivative endpoints the Tesseract serves.
    - `rtol`, `atol`: how close to the reference it is (depends on its dtype and
        maths: see `note`).
    - `requires`: `(module, requirement)` pairs it imports beyond ours.
    - `bad`: inputs its schema rules out, to be refused before any request.
    - `reason`: why it cannot run on this machine (`None` if it can).
    - `note`: what is particular about it (dtype, tolerance, endpoints).
    """

    name: str
    make_inputs: Callable[[Path], dict] | None = None
    ref: Callable[[dict], dict] | None = None
    wrt: tuple[str, ...] = ()
    of: tuple[str, ...] = ()
    endpoints: frozenset[str] = frozenset()
    rtol: float = 1e-5
    atol: float = 1e-6
    requires: tuple[tuple[str, str], ...] = ()
    bad: tuple[BadInput, ...] = ()
    reason: str | None = None
    note: str = ""

    def api(self, root: Path) -> Path:
        return Path(root) / self.name / "tesseract_api.py"

    def inputs(self, root: Path) -> dict:
        assert self.make_inputs is not None
        return self.make_inputs(Path(root) / self.name)

    def unavailable(self) -> str | None:
        """Why the example cannot run here, or `None`."""
        if self.reason is not None:
            return self.reason
        missing = [
            req for mod, req in self.requires if importlib.util.find_spec(mod) is None
        ]
        if missing:
            return (
                f"needs {', '.join(f'`{r}`' for r in missing)}, which is not "
                "installed (pyproject.toml's `dev` extras should list it)"
            )
        return None

    def fn(self, f: Callable[[dict], Any], inputs: dict, wrt: str) -> Callable:
        """`x -> differentiable outputs of f(inputs with x at wrt)`, keyed by path."""
        return lambda x: select(f(set_path(inputs, wrt, x)), self.of)


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _drop(path: str) -> Callable[[dict], dict]:
    def change(inputs: dict) -> dict:
        head, _, rest = path.rpartition(".")
        parent = dict(get_path(inputs, head)) if head else dict(inputs)
        del parent[rest]
        return set_path(inputs, head, parent) if head else parent

    return change


def _put(path: str, value: Callable[[], Any]) -> Callable[[dict], dict]:
    return lambda inputs: set_path(inputs, path, value())


# meshstats, meshstats_finitediff: the first point and the mean of a mesh's points.


def _mesh(dtype, n: int = 5) -> dict:
    rng = np.random.default_rng(0)
    # Two cells of 3 and 2 points: the model validators check these lengths.
    return {
        "n_points": n,
        "n_cells": 2,
        "points": jnp.asarray(rng.standard_normal((n, 3)), dtype),
        "num_points_per_cell": jnp.asarray([3.0, 2.0], dtype),
        "cell_connectivity": jnp.arange(5, dtype=jnp.int32),
        "cell_data": {"pressure": jnp.asarray(rng.standard_normal((2, 1)), dtype)},
        "point_data": {
            "velocity": jnp.asarray(rng.standard_normal((n, 3)), dtype),
            "temperature": jnp.asarray(rng.standard_normal((n, 1)), dtype),
        },
    }


def meshstats_ref(inputs: dict) -> dict:
    points = inputs["mesh"]["points"]
    return {
        "statistics": {
            "first_point_coordinates": points[0],
            "barycenter": jnp.mean(points, axis=0),
        }
    }


_MESH_BAD = (
    BadInput(
        "`points` of shape (5, 4) where the schema fixes (*, 3)",
        _put("mesh.points", lambda: jnp.zeros((5, 4), jnp.float32)),
        r"`mesh\.points`",
    ),
    BadInput("`n_cells` missing", _drop("mesh.n_cells"), r"`mesh\.n_cells`"),
)


# univariate, univariate_gradient_fallbacks: the Rosenbrock function of float32 scalars.


def univariate_inputs(folder: Path) -> dict:
    # `b` is left to its default (100); `a` is a Python float where a float32 scalar
    # array is expected.
    return {"x": _f32(0.5), "y": _f32(1.5), "a": 1.0}


def univariate_ref(inputs: dict) -> dict:
    x, y = inputs.get("x", 0.0), inputs.get("y", 0.0)
    a, b = inputs.get("a", 1.0), inputs.get("b", 100.0)
    return {"result": _f32((a - x) ** 2 + b * (y - x**2) ** 2)}


_UNIVARIATE_BAD = (
    BadInput(
        "`x` of shape (2,) where the schema says a scalar",
        _put("x", lambda: jnp.zeros(2, jnp.float32)),
        r"`x`",
    ),
)


# vectoradd: s * a + b in float32, declared float64 out.


def vectoradd_inputs(folder: Path) -> dict:
    rng = np.random.default_rng(1)
    return {
        "a": _f32(rng.standard_normal(4)),
        "b": _f32(rng.standard_normal(4)),
        "s": _f32(2.0),
        "normalize": False,
    }


def vectoradd_ref(inputs: dict) -> dict:
    if inputs.get("normalize", False):
        # Its hand-written `jacobian` is wrong for `normalize=True`: d/ds (and d/da
        # unless s = 1) disagree with the derivative of its own `apply`.
        raise NotImplementedError("vectoradd is tested with `normalize=False`.")
    s = inputs.get("s", 1.0)
    return {"result": (inputs["a"] * s + inputs["b"]).astype(jnp.float64)}


# vectoradd_jax, vectoradd_torch: nested models {v, s} -> sums, differences and norms.


def vectoradd_nested_inputs(folder: Path, norm_ord: int | None) -> dict:
    rng = np.random.default_rng(2)
    inputs: dict[str, Any] = {
        "a": {"v": _f32(rng.standard_normal(4)), "s": _f32(2.0)},
        # `b.s` is left to its default (1.0).
        "b": {"v": _f32(rng.standard_normal(4))},
    }
    if norm_ord is not None:
        inputs["norm_ord"] = norm_ord
    return inputs


def vectoradd_nested_ref(inputs: dict) -> dict:
    a = inputs["a"]["v"] * inputs["a"].get("s", 1.0)
    b = inputs["b"]["v"] * inputs["b"].get("s", 1.0)
    order = inputs.get("norm_ord", 2)
    out = {}
    for name, r in (("vector_add", a + b), ("vector_min", a - b)):
        out[name] = {"result": r, "normed_result": r / jnp.linalg.norm(r, ord=order)}
    return out


_NESTED_OUT = tuple(
    f"{group}.{leaf}"
    for group in ("vector_add", "vector_min")
    for leaf in ("result", "normed_result")
)
_NESTED_BAD = (
    BadInput(
        "`a.v` of rank 2 where the schema says a vector",
        _put("a.v", lambda: jnp.zeros((4, 1), jnp.float32)),
        r"`a\.v`",
    ),
    BadInput("`b.v` missing", _drop("b.v"), r"`b\.v`"),
)


# qp_solve: min 1/2 x'Qx + q'x subject to Ax = b, Gx <= h (qpax, float32).


def qp_inputs(folder: Path) -> dict:
    rng = np.random.default_rng(3)
    m = rng.standard_normal((3, 3))
    Q = m @ m.T + 3 * np.eye(3)
    A, b = rng.standard_normal((1, 3)), rng.standard_normal(1)
    G = np.array([[1.0, -0.5, 0.25]])
    # One inequality, far from active: qpax's VJP fails without any (a zero-size
    # reduction in its relaxed solve), and differentiates a problem relaxed by
    # `target_kappa`, which only an inactive constraint leaves (almost) exact.
    x = _qp_solve(Q, np.zeros(3), A, b)
    h = G @ x + 30.0
    return {
        "Q": _f32(Q),
        # Optional arrays: `q` given as `None` (zero), the solver settings omitted.
        "q": None,
        "A": _f32(A),
        "b": _f32(b),
        "G": _f32(G),
        "h": _f32(h),
    }


def _qp_solve(Q, q, A, b):
    n, m = Q.shape[0], A.shape[0]
    # The objective sees only Q's symmetric part, and so do qpax's derivatives.
    Qs = (Q + Q.T) / 2
    kkt = jnp.block([[Qs, A.T], [A, jnp.zeros((m, m), Q.dtype)]])
    return jnp.linalg.solve(kkt, jnp.concatenate([-q, b]))[:n]


def qp_ref(inputs: dict) -> dict:
    Q, A, b = inputs["Q"], inputs["A"], inputs["b"]
    q = inputs.get("q")
    q = jnp.zeros(Q.shape[0], Q.dtype) if q is None else q
    x = _qp_solve(Q, q, A, b)
    # Gx <= h is inactive: x does not depend on G or h (their derivatives are zero).
    return {"x": x, "objective_value": q @ x + 0.5 * x @ (Q @ x)}


_QP_BAD = (
    BadInput(
        "`Q` of rank 1 where the schema says a matrix",
        _put("Q", lambda: jnp.zeros(3, jnp.float32)),
        r"`Q`",
    ),
    BadInput("`Q` missing", _drop("Q"), r"`Q`"),
)


# dataloader: a LazySequence of (*, 3) arrays, read here from its own data files.


def dataloader_inputs(folder: Path) -> dict:
    from pydantic import TypeAdapter
    from tesseract_core.runtime import Array, Float32

    # Its testdata holds arrays in all three encodings (json, base64, binref).
    adapter = TypeAdapter(Array[(None, 3), Float32])
    data = []
    files = sorted(
        (folder / "testdata").glob("sample_*.json"),
        key=lambda p: int(p.stem.split("_")[1]),
    )
    for path in files:
        obj = json.loads(path.read_text())
        data.append(
            _f32(adapter.validate_python(obj, context={"base_dir": path.parent}))
        )
    return {"data": data}


def dataloader_ref(inputs: dict) -> dict:
    data = inputs["data"]
    return {
        "data": [2 * x for x in data],
        "data_sum": sum(jnp.sum(x, axis=0) for x in data),
    }


_DATALOADER_BAD = (
    BadInput(
        "`data.[1]` of shape (3, 2) where the schema fixes (*, 3)",
        _put("data.[1]", lambda: jnp.zeros((3, 2), jnp.float32)),
        r"`data\.?\[1\]`",
    ),
    BadInput("`data` missing", _drop("data"), r"`data`"),
)


# _gpu_jax: s * a + b with JAX; on a machine without a GPU, JAX runs it on the CPU.


def gpu_jax_inputs(folder: Path) -> dict:
    rng = np.random.default_rng(4)
    # `s` is a plain `float` in its schema: not an array, not differentiable.
    return {
        "a": _f32(rng.standard_normal(4)),
        "b": _f32(rng.standard_normal(4)),
        "s": 2.5,
    }


def gpu_jax_ref(inputs: dict) -> dict:
    return {"result": inputs.get("s", 3.0) * inputs["a"] + inputs["b"]}


_AB_BAD = (
    BadInput(
        "`a` of rank 2 where the schema says a vector",
        _put("a", lambda: jnp.zeros((4, 1), jnp.float32)),
        r"`a`",
    ),
    BadInput("`b` missing", _drop("b"), r"`b`"),
)


_FLOAT32 = "float32 throughout: compared at rtol 1e-5."

EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in [
        Example(
            "meshstats",
            lambda folder: {"mesh": _mesh(jnp.float32)},
            meshstats_ref,
            wrt=("mesh.points",),
            of=("statistics.first_point_coordinates", "statistics.barycenter"),
            endpoints=frozenset({JAC}),
            bad=_MESH_BAD,
            note=_FLOAT32 + " Serves `/jacobian` only (and a `barycenter` output "
            "whose default is its own description string).",
        ),
        Example(
            "meshstats_finitediff",
            # `fd_algorithm` is a Literal; "forward" is not its default.
            lambda folder: {"mesh": _mesh(jnp.float64), "fd_algorithm": "forward"},
            meshstats_ref,
            wrt=("mesh.points",),
            of=("statistics.first_point_coordinates", "statistics.barycenter"),
            endpoints=ALL_DERIVATIVES,
            rtol=1e-6,
            atol=1e-7,
            bad=(
                BadInput(
                    "`points` of shape (5, 2) where the schema fixes (*, 3)",
                    _put("mesh.points", lambda: jnp.zeros((5, 2))),
                    r"`mesh\.points`",
                ),
                BadInput(
                    "`cell_data` missing", _drop("mesh.cell_data"), r"`mesh\.cell_data`"
                ),
            ),
            note="float64, all derivatives by forward differences with eps = 1e-6: "
            "apply is linear, so only round-off (~1e-10) separates them from the "
            "exact ones; compared at rtol 1e-6, atol 1e-7.",
        ),
        Example(
            "univariate",
            univariate_inputs,
            univariate_ref,
            wrt=("x", "y"),
            of=("result",),
            endpoints=ALL_DERIVATIVES,
            bad=_UNIVARIATE_BAD,
            note=_FLOAT32 + " Every input has a default: none can be missing.",
        ),
        Example(
            "univariate_gradient_fallbacks",
            univariate_inputs,
            univariate_ref,
            wrt=("x", "y"),
            of=("result",),
            endpoints=ALL_DERIVATIVES,
            bad=_UNIVARIATE_BAD,
            note=_FLOAT32 + " JVP and VJP derived from its `jacobian` by "
            "tesseract-core's `jvp_from_jacobian` / `vjp_from_jacobian`.",
        ),
        Example(
            "vectoradd",
            vectoradd_inputs,
            vectoradd_ref,
            wrt=("a", "b", "s"),
            of=("result",),
            endpoints=frozenset({JAC}),
            bad=_AB_BAD,
            note=_FLOAT32 + " Computed in float32, declared float64 out. Tested with "
            "`normalize=False`: its hand-written Jacobian for `normalize=True` is "
            "wrong with respect to `s` (and to `a` unless s = 1).",
        ),
        Example(
            "vectoradd_jax",
            lambda folder: vectoradd_nested_inputs(folder, norm_ord=1),
            vectoradd_nested_ref,
            wrt=("a.v", "a.s", "b.v"),
            of=_NESTED_OUT,
            endpoints=ALL_DERIVATIVES,
            bad=_NESTED_BAD,
            note=_FLOAT32,
        ),
        Example(
            "vectoradd_torch",
            lambda folder: vectoradd_nested_inputs(folder, norm_ord=None),
            vectoradd_nested_ref,
            wrt=("a.v", "a.s", "b.v"),
            of=_NESTED_OUT,
            endpoints=ALL_DERIVATIVES,
            requires=(("torch", "torch==2.13.0"),),
            bad=_NESTED_BAD,
            note=_FLOAT32 + " No `abstract_eval` endpoint.",
        ),
        Example(
            "qp_solve",
            qp_inputs,
            qp_ref,
            wrt=("Q", "A", "b", "G", "h"),
            of=("x",),
            endpoints=frozenset({VJP}),
            rtol=1e-4,
            atol=1e-5,
            requires=(("qpax", "qpax==0.0.9"),),
            bad=_QP_BAD,
            note="float32 interior-point solve (qpax, `solver_tol` 1e-4) against an "
            "exact KKT solve: compared at rtol 1e-4, atol 1e-5. Serves the VJP "
            "only: forward mode needs the VJPs of the output basis.",
        ),
        Example(
            "dataloader",
            dataloader_inputs,
            dataloader_ref,
            wrt=("data.[0]", "data.[9]"),
            of=("data_sum",),
            endpoints=frozenset({JAC}),
            bad=_DATALOADER_BAD,
            note=_FLOAT32 + " The LazySequence is given as a list of arrays (read "
            "from its data files), not as an `@glob` string.",
        ),
        Example(
            "_gpu_jax",
            gpu_jax_inputs,
            gpu_jax_ref,
            wrt=("a", "b"),
            of=("result",),
            endpoints=ALL_DERIVATIVES,
            bad=_AB_BAD,
            note=_FLOAT32 + " Runs on the CPU here, so the CUDA-IPC transfer it "
            "exists to test is not exercised.",
        ),
        Example(
            "py310",
            reason="its `apply` asserts `sys.version_info[:2] == (3, 10)` (its "
            "config builds it on Python 3.10); this project runs on Python >= 3.11, "
            "so every `/apply` fails. Its `jacobian` also returns `{output: 0.0}` "
            "rather than `{output: {input: array}}`, which the runtime rejects.",
        ),
        Example(
            "fortran_enzyme",
            reason="it loads `/tesseract/enzyme/libheat_ad.so` (an absolute path, "
            "outside any temporary directory) at import. That library is built only "
            "in its Docker image, from Fortran by LFortran 0.61 (conda-forge), "
            "LLVM 19 (apt.llvm.org) and the Enzyme LLVM plugin (a GitHub nightly); "
            "LFortran and that plugin are on neither PyPI nor Debian, and those "
            "hosts are out of reach here.",
        ),
        Example(
            "_gpu_torch",
            reason='every endpoint moves its arrays to `device="cuda"`: it needs a '
            "CUDA GPU (and a CUDA build of torch); this machine has neither.",
        ),
        Example(
            "_gpu_cupy",
            reason="it imports `cupy` (`cupy-cuda12x[ctk]`), which needs a CUDA GPU "
            "and driver; this machine has none.",
        ),
    ]
}
