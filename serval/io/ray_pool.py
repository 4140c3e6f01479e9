"""A Ray cluster's pool of actors (`--ray`): where and how wide, the command-line options, and the map.

`serval predict` and `serval pseudolabel` run their model actors through `ray_map`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


@dataclass
class RaySettings:
    """Where and how wide: a cluster `address` (None: a local one), actors and what each holds."""

    address: str | None = None
    actors: int | None = None  # default: the cluster's CPUs (or GPUs) / each actor's share
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    num_cpus: int | None = None  # of a local cluster (default: this machine's)


def init_ray(settings: RaySettings, log: Callable[[str], None] | None = None):
    """Connect to the cluster at `settings.address`, or start a local one; never sends usage statistics."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read by ray.init and every process it starts
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError('--ray needs Ray Data: pip install "serval[ray]"', name="ray") from None
    if not ray.is_initialized():
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if settings.address:
            ray.init(address=settings.address, **quiet)
        else:
            ray.init(num_cpus=settings.num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def ray_map(
    rows: Sequence[str], worker: type, kwargs: dict, batch_size: int, settings: RaySettings
) -> Iterator[tuple[int, str]]:
    """(row index, result) of every row (JSON text), run by a pool of `worker` actors, as results come.

    `worker(**kwargs)` is built once per actor; called on {"i": indices, "x": rows} it returns
    {"i": indices, "y": results}.
    """
    ray = init_ray(settings)
    resources = ray.cluster_resources()
    if settings.actors:
        actors = settings.actors
    elif settings.gpus_per_actor:
        actors = max(1, int(resources.get("GPU", 0) // settings.gpus_per_actor))
    else:
        actors = max(1, int(resources.get("CPU", 1) // settings.cpus_per_actor))
    blocks = max(1, min(len(rows) // batch_size, actors * 4))
    ds = ray.data.from_items([{"i": i, "x": r} for i, r in enumerate(rows)], override_num_blocks=blocks)
    ds = ds.map_batches(
        worker,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor or None,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield from zip(batch["i"].tolist(), batch["y"].tolist())


def add_ray_arguments(p: argparse.ArgumentParser, note: str = "") -> None:
    """--ray [ADDRESS] and the actor pool's size and resources (predict, pseudolabel)."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on a Ray cluster (ray://HOST:10001, HOST:6379 or auto; a local one without ADDRESS)"
        + (f"; {note}" if note else ""),
    )
    p.add_argument(
        "--ray-actors", type=int, help="model actors (default: the cluster's CPUs or GPUs / per actor)"
    )
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs each actor holds (default 1)")
    p.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs each actor holds (default 0)")


def ray_settings(args: argparse.Namespace) -> RaySettings | None:
    """The RaySettings of --ray and its options; None without --ray."""
    if args.ray is None:
        return None
    return RaySettings(args.ray or None, args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor)
