"""Tasks by name: `TASKS` maps a name to its builder, `build_task(name, **params)` calls it;
`SOURCES` maps it to its `Source` (where the data comes from, whether it is available here).

Each task module exports `TASKS` and `SOURCES` for its own tasks; this module merges them.
Each builder returns a `diagssm.tasks.base.Task` and is deterministic in its `seed` parameter.
"""
import inspect

from diagssm.tasks import images, listops, memory, pathfinder, speech, synthetic, timeseries
from diagssm.tasks.base import Source, Task

__all__ = ["TASKS", "SOURCES", "Source", "Task", "build_task", "task_params", "check_params"]

MODULES = (synthetic, memory, listops, pathfinder, speech, images, timeseries)
TASKS, SOURCES = {}, {}
for _module in MODULES:
    for _name in _module.TASKS:
        if _name in TASKS:
            raise RuntimeError(f"task {_name!r} is registered twice (in {_module.__name__})")
        if _name not in _module.SOURCES:
            raise RuntimeError(f"task {_name!r} in {_module.__name__} has no Source")
    TASKS.update(_module.TASKS)
    SOURCES.update(_module.SOURCES)


def task_params(name):
    """The parameters task `name` accepts, with their defaults: {param: default}."""
    check_name(name)
    sig = inspect.signature(TASKS[name])
    return {k: p.default for k, p in sig.parameters.items()}


def check_name(name):
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not registered; known tasks: {', '.join(sorted(TASKS))}")


def check_params(name, params, where="section 'task.params'", exclude=()):
    """Raise ValueError naming the first key of `params` that task `name` does not take
    (or that is in `exclude`: keys set elsewhere, such as the config's task.seed); `where` says
    where the keys came from."""
    allowed = [k for k in task_params(name) if k not in exclude]
    for key in params:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} in {where} for task {name!r}; "
                             f"allowed: {', '.join(allowed)}")


def build_task(name, **params):
    """Build task `name` with `params` (see each builder's docstring; `seed` picks the data)."""
    check_params(name, params)
    return TASKS[name](**params)
