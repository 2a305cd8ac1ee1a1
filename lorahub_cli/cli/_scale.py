"""The scale-out options (`--ray [ADDRESS]`, `--workers`, `--ray-data`), declared once."""

from __future__ import annotations

from typing import Annotated

import typer

LOCAL = "local"

RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Run on Ray: alone, a Ray started on this machine; `auto`, the running cluster; "
        "or HOST:PORT / ray://HOST:PORT. Needs the ray extra.",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="With --ray: actors, each holding one loaded model (default: one per GPU, else one per node).",
    ),
]
RayDataOpt = Annotated[
    str,
    typer.Option(
        "--ray-data",
        help="With --ray: how the registry and model folder reach workers: auto, object-store or shared-path.",
    ),
]


def optional_address(args: list[str]) -> list[str]:
    """`--ray` takes an optional value, which Typer cannot declare: a bare `--ray` becomes `--ray local`.

    The next word is the address only if it looks like one (auto, local, HOST:PORT, ray://...), so
    `lorahub eval tasks --ray my-tasks/` keeps its folder."""
    result = []
    for i, arg in enumerate(args):
        result.append(arg)
        if arg == "--ray":
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or not (following in ("auto", LOCAL) or ":" in following):
                result.append(LOCAL)
    return result


def ray_options(ray: str | None, workers: int | None, ray_data: str, max_threads: int | None = None):
    """The RayOptions for --ray, or None to run here; --workers / --ray-data alone are a usage error."""
    from ..errors import InputError

    if ray is None:
        if workers is not None or ray_data != "auto":
            raise InputError(
                "--workers and --ray-data apply to Ray runs.", "Add --ray (or --ray auto to join a cluster)."
            )
        return None
    from ..scale.cluster import RayOptions, import_ray

    import_ray()  # before any work: without the extra, one line naming it
    return RayOptions(address=ray, workers=workers, data=ray_data, max_threads=max_threads)
