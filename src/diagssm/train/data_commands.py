"""`diagssm data list | build | show`: the tasks, their sources, building and looking at them.

    diagssm data list                     every task, where its data comes from, available here or why not
    diagssm data build listops --param max_length=512 [--seed 0] [--force]
    diagssm data show pathfinder --config configs/pathfinder32.yaml [--out picture.png]

Parameters come from a config's task section (--config), then --param KEY=VALUE (YAML values)
and --seed; `build` caches the task (see `diagssm.tasks.cache`) with a progress bar.
"""
import time
from pathlib import Path

from diagssm.tasks import cache, registry
from diagssm.train import config as config_mod
from diagssm.tasks.show import show, summary


def cmd_data(args):
    return {"list": data_list, "build": data_build, "show": data_show}[args.data_command](args)


def data_list(args):
    """Every task; "files" tasks read the user's files (task parameter path=) and are marked so."""
    print(f"{'task':<18} {'kind':<10} {'available':<10} origin")
    for name in sorted(registry.TASKS):
        source = registry.SOURCES[name]
        reason = None if source.kind == "files" else source.available()
        status = "path=" if source.kind == "files" else "yes" if reason is None else "no"
        print(f"{name:<18} {source.kind:<10} {status:<10} {source.origin}")
        if reason is not None:
            print(f"{'':<40} ({reason})")
    print("available: yes = builds here; path= = reads files you have (--param path=<folder>)")
    print(f"cache folder: {cache.cache_dir()} (set DIAGSSM_CACHE to move it)")
    return 0


def task_request(args):
    """(name, params) from --config, --param and --seed, checked against the builder's parameters."""
    name, params = args.task, {}
    if args.config:
        task = config_mod.load(args.config).task  # the checked task section
        if task.name != name:
            raise ValueError(f"--config {args.config} is for task {task.name!r}, not {name!r}")
        params.update(task.params, seed=task.seed)
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r} must be KEY=VALUE")
        params[key] = config_mod.read_value(value, f"--param {item!r}")
    if args.seed is not None:
        params["seed"] = args.seed
    registry.check_name(name)
    registry.check_params(name, params, where="--param")
    source = registry.SOURCES[name]
    user_files = source.kind == "files" or params.get("path") is not None
    reason = None if user_files else source.available()  # readers check their path= themselves
    if reason is not None:
        raise ValueError(f"task {name!r} cannot be built here: {reason}")
    return name, params


def data_build(args):
    name, params = task_request(args)
    cache.show_progress(True)
    cache.force_rebuild(args.force)
    start, first = time.perf_counter(), len(cache.EVENTS)
    task = registry.build_task(name, **params)
    events = cache.EVENTS[first:]
    done = "read from the cache" if events and all(e == "read" for e, _ in events) else "built"
    print(f"{name}: {done} in {time.perf_counter() - start:.1f} s (cache folder {cache.cache_dir()})")
    print("\n".join(summary(task)))
    return 0


def data_show(args):
    name, params = task_request(args)
    cache.show_progress(True)
    task = registry.build_task(name, **params)
    out = Path(args.out or f"{name}.png")
    print("\n".join(summary(task)))
    print(show(task, registry.SOURCES[name], out))
    print(f"saved {out}")
    return 0


def add_data(sub):
    p = sub.add_parser("data", help="list, build (cache) and look at the tasks",
                       description="Tasks: where their data comes from, building and caching them, examples.")
    data_sub = p.add_subparsers(dest="data_command", required=True, help="list, build or show")
    data_sub.add_parser("list", help="every task, its source, and whether it is available here")
    for what, text in (("build", "build the task and cache it (progress bar)"),
                       ("show", "print a few examples and save a picture")):
        q = data_sub.add_parser(what, help=text, description=text)
        q.add_argument("task", help="a task name (see diagssm data list)")
        q.add_argument("--config", help="take the task parameters from this YAML config's task section")
        q.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a builder parameter (repeatable; VALUE is read as YAML)")
        q.add_argument("--seed", type=int, help="the task seed (default: the config's, else 0)")
        if what == "build":
            q.add_argument("--force", action="store_true", help="build anew even if a cache exists")
        else:
            q.add_argument("--out", help="where to save the picture (default <task>.png)")
    p.set_defaults(run=cmd_data)
