"""The training configuration: four dataclass sections, read from YAML, overridden by `--set`.

    model:  the SequenceModel (layer, sizes, block options; encoder/head/pooling default to the task's)
    task:   which task (`diagssm.tasks.registry.TASKS`), its seed and its parameters
    optim:  AdamW, parameter groups, warm-up + cosine schedule, clipping, batch size
    run:    length, seeds, logging, evaluation, checkpoints, device, precision, torch.compile

A YAML file holds any subset of the sections; what it leaves out keeps the defaults below.
Unknown sections or keys are errors naming the key and the section. `--set key=value` takes a
dotted key (`optim.lr=1e-3`, `model.layer_kwargs.d_state=32`, `task.params.seq_len=512`); the
value is parsed by YAML and checked against the field's type. A float field also takes a
string that Python's float() reads, because YAML 1.1 (PyYAML) reads `1e-3` as a string.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple

import yaml


@dataclass
class ModelConfig:
    """diagssm.models.SequenceModel arguments. None = the task's default (encoder, head, pooling)."""

    layer: str = "s4d"
    d_model: int = 64
    n_layers: int = 4
    layer_kwargs: dict = field(default_factory=dict)
    norm: str = "layer"
    prenorm: bool = True
    activation: str = "gelu"
    dropout: float = 0.0
    encoder: Optional[str] = None
    pooling: Optional[str] = None
    head: Optional[str] = None


@dataclass
class TaskConfig:
    """A registered task: `name`, the `seed` of its generated data, builder `params`."""

    name: str = "recall"
    seed: int = 0
    params: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW over diagssm.optim.param_groups; lr warms up linearly, then follows `schedule`."""

    lr: float = 3e-3
    ssm_lr: float = 1e-3
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    batch_size: int = 32
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at max_steps) or "constant"
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None  # max global gradient norm; None: no clipping


@dataclass
class RunConfig:
    """Length, seed, logging, evaluation, checkpoints, device, precision and compilation of a run.

    Data-parallel training needs no key here: under torchrun (WORLD_SIZE > 1) the run is split
    over the processes and optim.batch_size is the global batch (`diagssm.train.world`).
    """

    max_steps: int = 1000
    seed: int = 0  # model initialisation, data order, dropout
    log_every: int = 50  # train rows in metrics.csv: means over this many steps
    eval_every: int = 250  # val rows; also at the last step
    checkpoint_every: int = 250  # also at the last step and on SIGINT/SIGTERM
    keep_last: int = 3  # step checkpoints kept; best.pt (by val metric) is kept apart
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"; an unavailable device is an error
    threads: Optional[int] = None  # torch.set_num_threads; None: torch's default (the cores)
    progress: bool = True  # tqdm progress bar (false: a line per validation instead)
    tensorboard: str = "auto"  # "auto" (use it when importable, say which), "on" (required), "off"
    precision: str = "fp32"  # "fp32", or "bf16": autocast around the forward, SSM layers kept in float32
    compile: bool = False  # torch.compile the model (an error, not a fallback, if it fails)
    inject_nan_at: Optional[int] = None  # testing: make the loss NaN at this step


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    ("optim", "schedule"): ("cosine", "constant"),
    ("run", "tensorboard"): ("auto", "on", "off"),
    ("run", "precision"): ("fp32", "bf16"),
}
POSITIVE = {("model", "d_model"), ("model", "n_layers"), ("optim", "batch_size"), ("optim", "lr"),
            ("run", "max_steps"), ("run", "log_every"), ("run", "eval_every"), ("run", "checkpoint_every"),
            ("run", "keep_last")}
NON_NEGATIVE = {("optim", "ssm_lr"), ("optim", "weight_decay"), ("optim", "warmup_steps"),
                ("optim", "min_lr_ratio"), ("model", "dropout"), ("task", "seed"), ("run", "seed")}


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value, tp, key):
    """`value` as type `tp` (int, float, bool, str, dict, Optional[...], Tuple[...]), or a
    ValueError naming the key, the value and the expected type. Never converts silently
    between kinds, except: an int or a numeric string is a valid float."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return None if value is None else coerce(value, inner, key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}={value!r}: expected a list of {len(args)} ({', '.join(map(_type_name, args))})")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (bool, str, dict) and isinstance(value, tp):
        return value
    raise ValueError(f"{key}={value!r} has type {type(value).__name__}; expected {_type_name(tp)}")


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_keys(data, allowed, message):
    """ValueError for the first key of `data` not in `allowed`; `message` is formatted with key."""
    for key in data:
        if key not in allowed:
            raise ValueError(message.format(key=key) + f"; allowed: {', '.join(allowed)}")


def _section(cls, data, name):
    """A `cls` section from the mapping `data`, every key checked."""
    if not isinstance(data, dict):
        raise ValueError(f"section {name!r} must be a mapping of keys to values; got {data!r}")
    types = _fields(cls)
    _check_keys(data, types, f"unknown key {{key!r}} in section {name!r}")
    return cls(**{k: coerce(_on_off(name, k, v), types[k], f"{name}.{k}") for k, v in data.items()})


def _on_off(section, key, value):
    """YAML reads an unquoted on/off as true/false: give a setting whose choices are "on"/"off" its word back."""
    if isinstance(value, bool) and {"on", "off"} <= set(CHOICES.get((section, key), ())):
        return "on" if value else "off"
    return value


def from_dict(data):
    """A checked TrainConfig from a nested mapping {section: {key: value}}."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping of sections to mappings; got {type(data).__name__}")
    sections = _fields(TrainConfig)
    _check_keys(data, sections, "unknown section {key!r} at the top level")
    cfg = TrainConfig(**{name: _section(sections[name], data[name] or {}, name) for name in data})
    check(cfg)
    return cfg


def to_dict(cfg):
    """The config as plain nested dicts and lists (what config.yaml holds)."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
            for name in _fields(TrainConfig)}


def check(cfg):
    """Value checks beyond types: choices, signs, and the task's parameter names."""
    from diagssm.tasks import registry

    for (sec, key), allowed in CHOICES.items():
        if getattr(getattr(cfg, sec), key) not in allowed:
            raise ValueError(f"{sec}.{key}={getattr(getattr(cfg, sec), key)!r}; allowed: {', '.join(allowed)}")
    if cfg.run.threads is not None and cfg.run.threads < 1:
        raise ValueError(f"run.threads={cfg.run.threads!r} must be >= 1 (or null for torch's default)")
    for keys, ok, words in ((POSITIVE, lambda v: v > 0, "> 0"), (NON_NEGATIVE, lambda v: v >= 0, ">= 0")):
        for sec, key in keys:
            value = getattr(getattr(cfg, sec), key)
            if not ok(value):
                raise ValueError(f"{sec}.{key}={value!r} must be {words}")
            if value == math.inf:
                raise ValueError(f"{sec}.{key}={value!r} must be finite")
    for sec in ("task", "run"):  # numpy's SeedSequence splits larger ints into words: 2**32 + s met s's streams
        if getattr(cfg, sec).seed >= 2 ** 32:
            raise ValueError(f"{sec}.seed={getattr(cfg, sec).seed!r} must be < 2**32")
    clip, ratio, betas = cfg.optim.grad_clip, cfg.optim.min_lr_ratio, cfg.optim.betas
    if clip is not None and not 0 < clip < math.inf:  # 0 would zero every gradient, < 0 flip their sign
        raise ValueError(f"optim.grad_clip={clip!r} must be a finite number > 0 (or null: no clipping)")
    if not ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={ratio!r} must be in [0, 1] (the cosine schedule's end, times lr)")
    for i, beta in enumerate(betas):
        if not 0 <= beta < 1:
            raise ValueError(f"optim.betas[{i}]={beta!r} must be in [0, 1) (Adam's averaging rates)")
    if cfg.task.name not in registry.TASKS:
        raise ValueError(f"task.name={cfg.task.name!r}; known tasks: {', '.join(sorted(registry.TASKS))}")
    if "seed" in cfg.task.params:
        raise ValueError("task.params.seed: set the data seed with task.seed")
    registry.check_params(cfg.task.name, cfg.task.params, exclude=("seed",))


def apply_overrides(data, overrides):
    """Apply `--set` strings ("a.b.c=value") to the nested mapping `data` (changed in place).

    The first two parts name a section and a field; further parts go into a dict field.
    """
    sections = _fields(TrainConfig)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=1e-3")
        if parts[0] not in sections:
            raise ValueError(f"--set {item!r}: unknown section {parts[0]!r}; allowed: {', '.join(sections)}")
        types = _fields(sections[parts[0]])
        if parts[1] not in types:
            raise ValueError(f"--set {item!r}: unknown key {parts[1]!r} in section {parts[0]!r}; "
                             f"allowed: {', '.join(types)}")
        if len(parts) > 2 and types[parts[1]] is not dict:
            raise ValueError(f"--set {item!r}: {parts[0]}.{parts[1]} is a {_type_name(types[parts[1]])}, "
                             f"not a mapping; it has no key {parts[2]!r}")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise ValueError(f"--set {item!r}: {part!r} holds {node[part]!r}, not a mapping")
            node = node[part]
        node[parts[-1]] = read_value(text, f"--set {item!r}")
    return data


def read_value(text, where):
    """A KEY=VALUE argument's value as YAML (`read_yaml`); not valid YAML is a ValueError naming
    `where` (it had escaped as a traceback)."""
    try:
        return read_yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None


class _UniqueKeys(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key given twice in one mapping: PyYAML keeps the last one silently,
    so a second `run:` section had replaced the first (max_steps and all) without a word."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, which may repeat keys
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # PyYAML's own check below says "found unhashable key"
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in this mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(stream):
    """yaml.safe_load, with a key given twice in a mapping an error (yaml.YAMLError)."""
    return yaml.load(stream, Loader=_UniqueKeys)


def load(path=None, overrides=()):
    """The TrainConfig from YAML file `path` (None: defaults) with `--set` strings applied."""
    data = {}
    if path is not None:
        with open(path) as f:
            try:
                data = read_yaml(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a mapping of sections; got {type(data).__name__}")
    return from_dict(apply_overrides(data, overrides))


def save(cfg, path):
    """Write the resolved config as YAML (load(path) gives it back), atomically: a resume rewrites it,
    and a half-written file would load as defaults."""
    from diagssm.files import atomic_write_text

    atomic_write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), path)


def diff(a, b):
    """{dotted key: (value in a, value in b)} for the fields where configs a and b differ."""
    da, db = to_dict(a), to_dict(b)
    return {f"{s}.{k}": (da[s][k], db[s][k]) for s in da for k in da[s] if da[s][k] != db[s][k]}
