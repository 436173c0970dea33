"""`RESULTS.md` and its plots, from the rows of `benchmarks/suite.py`.

A row is one contender (one setting of it) on one case: median seconds, the requests
of a timed call by endpoint, max abs difference from pure JAX, or the error that
stopped it. Ratios: "vs tesseract-jax" is the time of the fastest tesseract-jax
setting that worked on that case over the row's time (> 1: faster than
tesseract-jax); "vs pure JAX" is the row's time over pure JAX's.
"""

from pathlib import Path

from _scenarios import FAMILIES, SCENARIOS


OURS, STOCK = "tesseract_lx", "tesseract_lx, stock server"
PEER, FLOOR = "tesseract-jax", "pure JAX"
SHORT = {
    "jacobian_vector_product": "jvp",
    "vector_jacobian_product": "vjp",
    "batched_jacobian_vector_product": "batched jvp",
    "batched_vector_jacobian_product": "batched vjp",
}
TITLES = {
    "health": "an empty `GET /health` on the same server, timed between the JVPs",
    **{name: s.title for name, s in SCENARIOS.items()},
}


def _ok(r: dict) -> bool:
    return r["time"] is not None and r["error"] is None


def main_row(rows, key: str, contender: str) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["key"] == key and r["contender"] == contender and r["main"]
        ),
        None,
    )


def peer_best(rows, key: str) -> dict | None:
    done = [r for r in rows if r["key"] == key and r["contender"] == PEER and _ok(r)]
    return min(done, key=lambda r: r["time"], default=None)


def _ran_peer(rows, key: str) -> bool:
    return any(r["key"] == key and r["contender"] == PEER for r in rows)


def ms(seconds: float) -> str:
    milli = seconds * 1e3
    return f"{milli:.3g} ms" if milli < 1000 else f"{seconds:.3g} s"


def _times(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.3g}x"


def requests_text(r: dict) -> str:
    if not r["sent"]:
        return "-" if r["contender"] == FLOOR or r["time"] is None else "0"
    parts = ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in sorted(r["sent"].items()))
    return f"{sum(r['sent'].values())} ({parts})"


def _note(r: dict) -> str:
    notes = []
    if r["error"] is not None:
        notes.append(r["error"].replace("|", "\\|"))
    if r["steps"] is not None:
        notes.append(f"{r['steps']} steps")
        total = sum(r["sent"].values())
        if r["scenario"].startswith("newton") and total and r["steps"]:
            notes.append(f"{total / r['steps']:.2g} requests/step")
    if r["ok"] is False:
        notes.append("**did not converge**")
    if r.get("fallback"):
        first = r["fallback"].split(". ")[0].rstrip(".")
        notes.append("fell back: " + first.replace("|", "\\|"))
    if r.get("note"):
        notes.append(r["note"])
    if r.get("trip"):
        notes.append(f"a bare `GET /health` through the proxy: {ms(r['trip'])}")
    if len(set(r["requests"])) > 1:
        notes.append(f"requests vary: {min(r['requests'])}-{max(r['requests'])}")
    return "; ".join(notes)


def speedup(rows, r: dict) -> float | None:
    best = peer_best(rows, r["key"])
    return None if best is None or not _ok(r) else best["time"] / r["time"]


def _cells(rows: list[dict], r: dict) -> list[str]:
    """The cells of one row of a family's table."""
    x = speedup(rows, r)
    if x is None:
        vs_peer = "-"
    elif r is peer_best(rows, r["key"]):
        vs_peer = "(fastest setting)"
    else:
        vs_peer = f"{_times(x)} faster" if x >= 1 else f"{_times(1 / x)} slower"
    floor = main_row(rows, r["key"], FLOOR)
    vs_floor = "-"
    if _ok(r) and floor is not None and _ok(floor) and r is not floor:
        vs_floor = _times(r["time"] / floor["time"])
    return [
        r["key"],
        r["contender"],
        r["variant"],
        requests_text(r),
        "**failed**" if r["time"] is None else ms(r["time"]),
        vs_peer,
        vs_floor,
        "-" if r["err"] is None else f"{r['err']:.1e}",
        _note(r),
    ]


def table(rows: list[dict], family: str) -> str:
    lines = [
        "| case | contender | setting | requests (by endpoint) | median | "
        "vs tesseract-jax | vs pure JAX | max abs err | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        "| " + " | ".join(_cells(rows, r)) + " |" for r in rows if r["family"] == family
    ]
    return "\n".join(lines)


#
# Targets
#


class Targets:
    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.lines = ["| target | measured | |", "|---|---|---|"]

    def add(self, text: str, figure: str, ok: bool | None) -> None:
        verdict = {True: "met", False: "**not met**", None: "not measured"}[ok]
        self.lines.append(f"| {text} | {figure} | {verdict} |")

    def ours(self, scenario: str, **where) -> list[dict]:
        """tesseract_lx's main rows of `scenario` (near, unless `rtt_ms` is given)."""
        where = {"rtt_ms": 0.0, **where}
        return [
            r
            for r in self.rows
            if r["contender"] == OURS
            and r["main"]
            and r["scenario"] == scenario
            and all(r[k] == v for k, v in where.items())
        ]

    def faster(self, text: str, scenario: str, factor: float, **where) -> None:
        rows = self.ours(scenario, **where)
        if not rows:
            return self.add(text, "not run", None)
        figures, verdicts = [], []
        for r in rows:
            x, what = speedup(self.rows, r), f"{r['tesseract']} n={r['n']}"
            if x is None:
                if not _ok(r):
                    figures.append(f"{what}: tesseract_lx failed")
                    verdicts.append(False)
                elif _ran_peer(self.rows, r["key"]):
                    figures.append(f"{what}: every tesseract-jax setting failed")
                    verdicts.append(True)
                else:
                    figures.append(f"{what}: no tesseract-jax run")
                    verdicts.append(None)
                continue
            best = peer_best(self.rows, r["key"])
            assert best is not None
            stock = main_row(self.rows, r["key"], STOCK)
            alone = speedup(self.rows, stock) if stock is not None else None
            figures.append(
                f"{what}: {x:.3g}x ({ms(r['time'])} vs {ms(best['time'])} with "
                f"`{best['variant']}`; {sum(r['sent'].values())} vs "
                f"{sum(best['sent'].values())} requests)"
                + ("" if alone is None else f"; on a stock server {alone:.3g}x")
            )
            verdicts.append(x >= factor)
        self.add(text, "; ".join(figures), _all(verdicts))

    def text(self) -> str:
        return "\n".join(self.lines)


def _all(verdicts: list[bool | None]) -> bool | None:
    if False in verdicts:
        return False
    return None if None in verdicts or not verdicts else True


def targets(rows: list[dict]) -> str:
    """The targets of issue 21, each against tesseract-jax's fastest setting that
    worked in the same run (`tesseract-lx serve`; the stock server's ratio beside)."""
    t = Targets(rows)
    figures, verdicts = [], []
    for r in t.ours("jvp"):
        if r["n"] > 1000:
            continue
        health = main_row(rows, r["key"].replace("jvp", "health", 1), OURS)
        if not _ok(r) or health is None:
            figures.append(f"n={r['n']}: failed")
            verdicts.append(False)
            continue
        x = r["time"] / health["time"]
        figures.append(
            f"n={r['n']}: {x:.2f}x ({ms(r['time'])} vs {ms(health['time'])}, "
            f"{requests_text(r)})"
        )
        verdicts.append(x <= 2 and sum(r["sent"].values()) == 1)
    t.add(
        "one jitted JVP request at n <= 1000 through `TesseractModule` to `tesseract-lx "
        "serve`: within 2x of a bare keep-alive `GET /health` on the same server",
        "; ".join(figures) or "not run",
        _all(verdicts),
    )
    t.faster("Newton+LU at n ~ 128: >= 2.5x tesseract-jax", "newton_lu", 2.5, n_side=11)
    per_step = [
        (r["n"], sum(r["sent"].values()) / r["steps"])
        for r in t.ours("newton_lu")
        if _ok(r) and r["steps"]
    ]
    t.add(
        "Newton+LU: <= 2 requests per step",
        "; ".join(f"n={n}: {x:.2g}" for n, x in per_step) or "not run",
        _all([x <= 2 for _, x in per_step]) if per_step else None,
    )
    t.faster(
        "Newton with a local `lx.GMRES` at n = 256: >= 2.5x tesseract-jax",
        "newton_gmres",
        2.5,
        n_side=16,
    )
    t.faster(
        "a vmapped local `lx.GMRES` over 4 right-hand sides at n ~ 512: >= 3x "
        "tesseract-jax",
        "vmap_gmres",
        3,
        k=4,
    )
    t.faster(
        "Newton with `tlx.OnServer(lx.GMRES(...))` at n = 256, on a Tesseract with two "
        "outputs too (`springs`): >= 20x tesseract-jax",
        "newton_onserver",
        20,
        n_side=16,
    )
    heavy = t.ours("vmap_jvp", tesseract="heavy", k=4)
    t.faster(
        "4 JVPs on the expensive Tesseract at n = 256: >= 4x tesseract-jax, 1 request",
        "vmap_jvp",
        4,
        tesseract="heavy",
        k=4,
    )
    if heavy and sum(heavy[0]["sent"].values()) != 1:
        t.lines[-1] = (
            t.lines[-1].rsplit("|", 2)[0]
            + f"| **not met** ({requests_text(heavy[0])}) |"
        )
    t.faster(
        "at a 50 ms round trip, Newton with `tlx.OnServer(lx.GMRES(...))` at n = 256: "
        ">= 20x tesseract-jax",
        "newton_onserver",
        20,
        rtt_ms=50.0,
    )
    t.faster(
        "at a 50 ms round trip, the whole Newton solve on the server "
        "(`tlx.OnServer(optx.Newton(...))`) at n = 256: >= 100x tesseract-jax",
        "newton_whole",
        100,
        rtt_ms=50.0,
    )
    whole = [r for r in t.ours("newton_whole") if _ok(r)]
    t.add(
        "the whole Newton solve on the server (`tlx.OnServer(optx.Newton(...))`) on "
        "`tesseract-lx serve`: 1 request per solve",
        "; ".join(
            f"{r['tesseract']} n={r['n']}: {requests_text(r)}" for r in whole
        )
        or "not run",
        _all([r["sent"] == {"nonlinear_solve": 1} for r in whole]) if whole else None,
    )
    onserver = [r for r in t.ours("newton_onserver") if _ok(r) and r["steps"]]
    figures = [
        f"{r['tesseract']} n={r['n']}: {sum(r['sent'].values()) / r['steps']:.2g}"
        for r in onserver
    ]
    t.add(
        "Newton with `tlx.OnServer(lx.GMRES(...))` on `tesseract-lx serve`: 2 requests "
        "per step",
        "; ".join(figures) or "not run",
        _all([sum(r["sent"].values()) <= 2 * r["steps"] for r in onserver])
        if onserver
        else None,
    )
    failed = [r for r in rows if r["contender"] == PEER and r["time"] is None]
    figures, verdicts = [], []
    for r in failed:
        mine = main_row(rows, r["key"], OURS)
        works = mine is not None and _ok(mine) and mine["ok"] is not False
        kind = (r["error"] or "?").split(":", 1)[0]
        figures.append(
            f"{r['key']} ({r['variant']}): {kind}; tesseract_lx "
            + (ms(mine["time"]) if works and mine is not None else "**fails too**")
        )
        verdicts.append(works)
    t.add(
        "every scenario where a tesseract-jax setting fails works",
        "<br>".join(figures) or "tesseract-jax did not fail (or did not run)",
        _all(verdicts) if failed else None,
    )
    return t.text()


#
# Side by side: the cases of issue 21, each contender at its best
#

HEADLINE = (
    ("4 JVPs on the expensive Tesseract", "vmap_jvp", {"tesseract": "heavy", "k": 4}),
    ("vmapped local `lx.GMRES`, 4 right-hand sides", "vmap_gmres", {}),
    ("Newton + LU", "newton_lu", {}),
    ("Newton + local `lx.GMRES`", "newton_gmres", {}),
    ("Newton + `tlx.OnServer(lx.GMRES(...))`", "newton_onserver", {}),
    ("the whole Newton solve: `tlx.OnServer(optx.Newton(...))`", "newton_whole", {}),
    ("vmapped `tlx.OnServer(lx.GMRES(...))`, 4 right-hand sides", "vmap_onserver", {}),
)


def _side(rows: list[dict], r: dict | None, *, ratio: bool) -> str:
    if r is None:
        return "not run"
    if not _ok(r):
        return "**failed**: " + (r["error"] or "?").split(":", 1)[0]
    total = sum(r["sent"].values())
    text = f"{ms(r['time'])}, {total} request{'' if total == 1 else 's'}"
    if r.get("fallback"):
        text += " (fell back: solved here)"
    if ratio:
        x = speedup(rows, r)
        text += "" if x is None else f", **{_times(x)}**"
    else:
        text += f" (`{r['variant']}`)"
    return text


def headline(rows: list[dict], *, far: bool) -> str:
    """The cases of issue 21 (near, or through the proxy): tesseract-jax's fastest
    setting, tesseract_lx on a stock server and on `tesseract-lx serve`, ratios to
    tesseract-jax; and one JVP request against an empty `GET /health`."""
    lines = [
        ("| round trip (a bare `GET /health` through the proxy) " if far else "")
        + f"| case | {PEER}, fastest setting | {STOCK} | {OURS}, `tesseract-lx serve` |",
        ("|---" if far else "") + "|---|---|---|---|",
    ]
    for title, scenario, where in HEADLINE:
        for r in rows:
            if not (
                r["contender"] == OURS
                and r["main"]
                and r["scenario"] == scenario
                and bool(r["rtt_ms"]) == far
                and all(r[k] == v for k, v in where.items())
            ):
                continue
            k = f", K={r['k']}" if r["k"] and "k" not in where else ""
            cells = [
                f"{title}, {r['tesseract']} n={r['n']}{k}",
                _side(rows, peer_best(rows, r["key"]), ratio=False),
                _side(rows, main_row(rows, r["key"], STOCK), ratio=True),
                _side(rows, r, ratio=True),
            ]
            if far:
                trip = f" ({ms(r['trip'])})" if r.get("trip") else ""
                cells.insert(0, f"{r['rtt_ms']:g} ms{trip}")
            lines.append("| " + " | ".join(cells) + " |")
    if not far:
        for r in rows:
            if r["scenario"] != "jvp" or r["contender"] != OURS or not r["main"]:
                continue
            cells = [
                f"one jitted JVP request / a bare keep-alive `GET /health` (each "
                f"client's own), {r['tesseract']} n={r['n']}"
            ]
            for who in (PEER, STOCK, OURS):
                jvp = main_row(rows, r["key"], who)
                health = main_row(rows, r["key"].replace("jvp", "health", 1), who)
                if jvp is None or health is None or not _ok(jvp):
                    cells.append("not run" if jvp is None else "**failed**")
                    continue
                cells.append(
                    f"{ms(jvp['time'])} / {ms(health['time'])} = "
                    f"**{jvp['time'] / health['time']:.2f}x**"
                )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#
# Plots
#


def plot(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(r["key"] for r in rows))  # in the order of the rows
    picks = {
        OURS: (lambda k: main_row(rows, k, OURS), "tab:blue"),
        STOCK: (lambda k: main_row(rows, k, STOCK), "tab:cyan"),
        f"{PEER} (fastest setting)": (lambda k: peer_best(rows, k), "tab:orange"),
        FLOOR: (lambda k: main_row(rows, k, FLOOR), "tab:green"),
    }
    names = []
    for what, unit, file in (
        ("time", "median wall time [ms]", "results_time.png"),
        ("requests", "requests per call", "results_requests.png"),
    ):
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(keys) + 1.5))
        drawn = {k: v for k, v in picks.items() if what == "time" or k != FLOOR}
        height = 0.8 / len(drawn)
        for i, (label, (pick, color)) in enumerate(drawn.items()):
            ys, xs = [], []
            for j, key in enumerate(keys):
                r = pick(key)
                if r is None or not _ok(r):
                    continue
                x = r["time"] * 1e3 if what == "time" else sum(r["sent"].values())
                ys.append(j + (i - (len(drawn) - 1) / 2) * height)
                xs.append(max(x, 1e-3 if what == "time" else 0.5))
            ax.barh(ys, xs, height=height, label=label, color=color)
        ax.set_xscale("log")
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(unit + " (log scale; no bar: failed or not run)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file, dpi=90)
        plt.close(fig)
        names.append(file)
    return names


#
# The page
#


def _nested(markdown: str) -> str:
    """`markdown` with its headings two levels down (it goes under an `##`)."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        lines.append("##" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines)


def provenance(meta: dict) -> list[str]:
    """Where the figures come from, as Markdown bullets."""
    mode = (
        " with `--quick`: every scenario at its smallest size, far at 1 ms only, "
        "3 repeats"
        if meta["smallest"]
        else ""
    )
    return [
        f"Made by `bash dev.sh bench`{mode} (`benchmarks/suite.py`, whose docstring "
        "says how each figure is measured), of tesseract_lx at commit "
        f"`{meta['commit']}`.",
        "",
        f"- Date: {meta['date']}; the whole run took {meta['seconds'] / 60:.1f} min "
        f"(the far rows {meta.get('far_seconds', 0) / 60:.1f} min of it).",
        f"- Machine: {meta['machine']}; loopback HTTP, servers with 1 worker; load "
        f"average (1 min) {meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} "
        "at the end (other work on the machine slows every contender).",
        f"- tesseract-jax: {meta['peer']}.",
        f"- Every contender ran with: {meta['versions']}.",
    ]


def write_results(rows: list[dict], meta: dict, out: Path, *, profile: Path) -> None:
    pictures = plot(rows, out)
    profile_text = "not measured"
    if profile.exists():
        profile_text = f"From `benchmarks/{profile.name}`:\n\n" + _nested(
            profile.read_text().strip()
        )
    lines = [
        "# Benchmarks: tesseract_lx, tesseract-jax and pure JAX",
        "",
        *provenance(meta),
        "",
        "Contenders, all under the same JAX: tesseract_lx "
        "(`TesseractModule(client, batching=...)`) on `tesseract-lx serve` (the "
        "library and its server) and on a stock `tesseract-runtime serve` (the library "
        "alone), tesseract-jax (`apply_tesseract` on a `Tesseract.from_url` to the "
        "stock server, every setting that changes how it sends a batch), pure JAX "
        "(the same maths in process). Median of the timed calls after warm-up (one "
        "call; up to three while under a second), all jitted, float64. vs "
        "tesseract-jax: the time of its fastest setting that works on that case over "
        "the row's time; vs pure JAX: the row's time over pure JAX's. The first "
        "setting of tesseract_lx (`tlx.Auto()`) is the one in the targets and plots. "
        "Far rows: every request through a delaying TCP proxy on 127.0.0.1 "
        "(`benchmarks/_proxy.py`) at the round trip given, every contender through the "
        "same proxy; tesseract-jax with its settings that were fastest, or sent the "
        "fewest requests, near.",
        "",
        "## Side by side",
        "",
        headline(rows, far=False),
        "",
        "### Far away",
        "",
        headline(rows, far=True),
        "",
        "## Targets",
        "",
        targets(rows),
        "",
        "Newton-GMRES on the heavy Tesseract with the server's linearisation compiled "
        "once and traced at every point: `linearisation.md`, made by the same command.",
        "",
        "## Per-request time profile",
        "",
        "<!-- profile -->",
        profile_text,
        "",
    ]
    for family, name in FAMILIES.items():
        if not any(r["family"] == family for r in rows):
            continue
        scenarios = dict.fromkeys(r["scenario"] for r in rows if r["family"] == family)
        lines += [f"## {name}", ""]
        lines += [f"- `{s}`: {TITLES[s]}" for s in scenarios]
        lines += ["", table(rows, family), ""]
    lines += ["## Plots", ""]
    lines += [f"![{p}]({p})" for p in pictures]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
