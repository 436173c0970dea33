"""mkdocs hooks: the Benchmarks section shows what `bash dev.sh bench` last wrote.

`benchmarks/RESULTS.md`, `benchmarks/linearisation.md` and the plots stay where the
benchmark writes them; they join the site as `benchmarks/results.md`, ... at build
time, so the site never holds a stale copy.
"""

from pathlib import Path

from mkdocs.structure.files import File, Files


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PAGES = {
    "results.md": "RESULTS.md",
    "linearisation.md": "linearisation.md",
    "results_time.png": "results_time.png",
    "results_requests.png": "results_requests.png",
}


def on_files(files: Files, config) -> Files:
    for name, source in PAGES.items():
        files.append(
            File.generated(
                config, f"benchmarks/{name}", abs_src_path=str(BENCHMARKS / source)
            )
        )
    return files
