"""`RESULTS.md` and its plots, from the rows of `benchmarks/suite.py`.

A row is one contender (one setting of it) on one case: median seconds, the requests
of a timed call by endpoint, max abs difference from pure JAX, or the error that
stopped it. Ratios: "vs tesseract-jax" is the time of the fastest tesseract-jax
setting that worked on that case over the row's time (> 1: faster than
tesseract-jax); "vs pure JAX" is the row's time over pure JAX's.
"""

from pathlib import Path

from _scenarios import FAMILIES, SCENARIOS


OURS, PEER, FLOOR = "tesseract_lx", "tesseract-jax", "pure JAX"
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


def _main(rows, key: str, contender: str) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["key"] == key and r["contender"] == contender and r["main"]
        ),
        None,
    )


def _peer_best(rows, key: str) -> dict | None:
    done = [r for r in rows if r["key"] == key and r["contender"] == PEER and _ok(r)]
    return min(done, key=lambda r: r["time"], default=None)


def _ran_peer(rows, key: str) -> bool:
    return any(r["key"] == key and r["contender"] == PEER for r in rows)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 1000 else f"{seconds:.3g} s"


def _times(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.3g}x"


def _sent(r: dict) -> str:
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
    if len(set(r["requests"])) > 1:
        notes.append(f"requests vary: {min(r['requests'])}-{max(r['requests'])}")
    return "; ".join(notes)


def speedup(rows, r: dict) -> float | None:
    best = _peer_best(rows, r["key"])
    return None if best is None or not _ok(r) else best["time"] / r["time"]


def _cells(rows: list[dict], r: dict) -> list[str]:
    """The cells of one row of a family's table."""
    x = speedup(rows, r)
    if x is None:
        vs_peer = "-"
    elif r is _peer_best(rows, r["key"]):
        vs_peer = "(fastest setting)"
    else:
        vs_peer = f"{_times(x)} faster" if x >= 1 else f"{_times(1 / x)} slower"
    floor = _main(rows, r["key"], FLOOR)
    vs_floor = "-"
    if _ok(r) and floor is not None and _ok(floor) and r is not floor:
        vs_floor = _times(r["time"] / floor["time"])
    return [
        r["key"],
        r["contender"],
        r["variant"],
        _sent(r),
        "**failed**" if r["time"] is None else _ms(r["time"]),
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
            x = speedup(self.rows, r)
            if x is None:
                if not _ok(r):
                    figures.append(f"n={r['n']}: tesseract_lx failed")
                    verdicts.append(False)
                elif _ran_peer(self.rows, r["key"]):
                    figures.append(f"n={r['n']}: every tesseract-jax setting failed")
                    verdicts.append(True)
                else:
                    figures.append(f"n={r['n']}: no tesseract-jax run")
                    verdicts.append(None)
                continue
            best = _peer_best(self.rows, r["key"])
            figures.append(
                f"n={r['n']}: {x:.3g}x ({_ms(r['time'])} vs {_ms(best['time'])} with "
                f"`{best['variant']}`; {sum(r['sent'].values())} vs "
                f"{sum(best['sent'].values())} requests)"
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
    t = Targets(rows)
    figures, verdicts = [], []
    for r in t.ours("jvp"):
        if r["n"] > 1000:
            continue
        health = _main(rows, r["key"].replace("jvp", "health", 1), OURS)
        if not _ok(r) or health is None:
            figures.append(f"n={r['n']}: failed")
            verdicts.append(False)
            continue
        x = r["time"] / health["time"]
        figures.append(
            f"n={r['n']}: {x:.2f}x ({_ms(r['time'])} vs {_ms(health['time'])}, "
            f"{_sent(r)})"
        )
        verdicts.append(x <= 2 and sum(r["sent"].values()) == 1)
    t.add(
        "one JVP request at n <= 1000 through `TesseractModule` to `tesseract-lx "
        "serve`: within 2x of an empty `GET /health` on the same server",
        "; ".join(figures) or "not run",
        _all(verdicts),
    )
    t.faster(
        "a vmapped GMRES over 4 right-hand sides at n ~ 512: >= 15x faster than "
        "tesseract-jax",
        "vmap_gmres",
        15,
        k=4,
    )
    heavy = t.ours("vmap_jvp", tesseract="heavy", k=4)
    t.faster(
        "4 JVPs on the expensive Tesseract at n = 256: >= 25x faster than "
        "tesseract-jax, 1 request",
        "vmap_jvp",
        25,
        tesseract="heavy",
        k=4,
    )
    if heavy and sum(heavy[0]["sent"].values()) != 1:
        t.lines[-1] = (
            t.lines[-1].rsplit("|", 2)[0] + f"| **not met** ({_sent(heavy[0])}) |"
        )
    t.faster("Newton+LU: >= 1.2x faster than tesseract-jax", "newton_lu", 1.2)
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
        "Newton+GMRES at n = 256 (heavy): >= 2x faster than tesseract-jax",
        "newton_gmres",
        2,
        tesseract="heavy",
    )
    # The Krylov loop on the server (`tlx.OnServer`).
    t.faster(
        "Newton+GMRES at n = 256 with `tlx.OnServer`: >= 10x faster than tesseract-jax",
        "newton_onserver",
        10,
        tesseract="bratu",
        n=256,
    )
    onserver = [r for r in t.ours("newton_onserver") if _ok(r) and r["steps"]]
    health = [r for r in rows if r["contender"] == OURS and r["scenario"] == "health"]
    figures, verdicts = [], []
    for r in onserver:
        steps, sent = r["steps"], sum(r["sent"].values())
        floor = _main(rows, r["key"], FLOOR)
        line = f"{r['tesseract']} n={r['n']}: {sent / steps:.2g} requests per step"
        ok = sent <= 2 * steps
        if floor is not None and floor["time"] and health:
            trip = min(h["time"] for h in health)
            bound = floor["time"] + sent * trip
            line += (
                f", {_ms(r['time'])} vs floor + round trips {_ms(bound)} "
                f"({r['time'] / bound:.2g}x)"
            )
            ok = ok and r["time"] <= 3 * bound
        figures.append(line if r["tesseract"] == "bratu" else f"({line}: not a target)")
        if r["tesseract"] == "bratu":
            verdicts.append(ok)
    t.add(
        "Newton+GMRES with `tlx.OnServer` on the cheap Tesseract: 2 requests per step, "
        "within 3x of the pure-JAX floor plus the requests' round trips (an empty "
        "`GET /health` each)",
        "; ".join(figures) or "not run",
        _all(verdicts) if figures else None,
    )
    t.faster(
        "a vmapped GMRES over 4 right-hand sides at n ~ 512 with `tlx.OnServer`: "
        ">= 50x faster than tesseract-jax",
        "vmap_onserver",
        50,
        k=4,
    )
    vmapped = t.ours("vmap_onserver", k=4)
    if vmapped and sum(vmapped[0]["sent"].values()) != 1:
        t.lines[-1] = (
            t.lines[-1].rsplit("|", 2)[0] + f"| **not met** ({_sent(vmapped[0])}) |"
        )
    failed = [r for r in rows if r["contender"] == PEER and r["time"] is None]
    figures, verdicts = [], []
    for r in failed:
        mine = _main(rows, r["key"], OURS)
        works = mine is not None and _ok(mine) and mine["ok"] is not False
        kind = r["error"].split(":", 1)[0]
        figures.append(
            f"{r['key']} ({r['variant']}): {kind}; tesseract_lx "
            + (_ms(mine["time"]) if works else "**fails too**")
        )
        verdicts.append(works)
    t.add(
        "every scenario where tesseract-jax fails works",
        "<br>".join(figures) or "tesseract-jax did not fail (or did not run)",
        _all(verdicts) if failed else None,
    )
    return t.text()


#
# Plots
#


def plot(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(r["key"] for r in rows))  # in the order of the rows
    picks = {
        OURS: (lambda k: _main(rows, k, OURS), "tab:blue"),
        f"{PEER} (fastest setting)": (lambda k: _peer_best(rows, k), "tab:orange"),
        FLOOR: (lambda k: _main(rows, k, FLOOR), "tab:green"),
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


def write_results(rows: list[dict], meta: dict, out: Path, *, profile: Path) -> None:
    pictures = plot(rows, out)
    profile_text = "not measured"
    if profile.exists():
        profile_text = f"From `benchmarks/{profile.name}`:\n\n" + _nested(
            profile.read_text().strip()
        )
    mode = ", with `--smallest`: every scenario at its smallest size, 3 repeats"
    lines = [
        "# Benchmarks: tesseract_lx, tesseract-jax and pure JAX",
        "",
        "Made by `bash dev.sh bench` (`benchmarks/suite.py`, whose docstring says how "
        "each figure is measured)" + (mode if meta["smallest"] else "") + ".",
        "",
        f"- Date: {meta['date']}; total time {meta['seconds']:.0f} s.",
        f"- Machine: {meta['machine']}; loopback HTTP, servers with 1 worker; load "
        f"average (1 min) {meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} "
        "at the end (other work on the machine slows every contender).",
        f"- This venv: {meta['versions']}.",
        f"- tesseract-jax's venv: {meta['peer']}.",
        "",
        "Contenders: tesseract_lx (`TesseractModule(client, batching=...)` on "
        "`tesseract-lx serve`), tesseract-jax (`apply_tesseract` on a "
        "`Tesseract.from_url` to a stock `tesseract-runtime serve`), pure JAX (the "
        "same maths in process). Median of the timed calls after warm-up (one call; up to three while under a second), "
        "all jitted, float64. vs tesseract-jax: the fastest tesseract-jax setting "
        "that works on that case over the row's time; vs pure JAX: the row's time over "
        "pure JAX's. The first setting of tesseract_lx (`tlx.Auto()`) is the one in "
        "the targets and plots.",
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
