"""Methods registered by name, their typed hyper-parameters and their defaults per model."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kedit.analysis.locate import auto_layers
from kedit.edits import WeightDelta
from kedit.hparams import DEFAULT, OVERRIDE, Setting, corpus_setting, model_settings
from kedit.lm import LM
from kedit.requests import EditRequest


def hp(default: Any, help: str, **kwargs: Any) -> Any:
    """A hyper-parameter field: a default and the one-line help shown by the CLI and docs."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class HyperParams:
    """Base of every method's hyper-parameters.

    `ALIASES` maps EasyEdit's key names onto ours where they mean the same thing;
    `IGNORED` lists EasyEdit keys that describe things kedit finds by itself (module paths,
    which the Layout knows) and are accepted without effect. `MULTI_LABEL` says whether the
    method edits towards all of a request's `targets` (Multi-Label Edit); methods that edit
    towards `target_new` alone leave it False and refuse requests with `extra_targets`.
    """

    ALIASES: typing.ClassVar[dict[str, str]] = {}
    MULTI_LABEL: typing.ClassVar[bool] = False
    # Whether the method has settings that depend on the model (the model table's); a trained
    # editor's are the editor's own.
    PER_MODEL: typing.ClassVar[bool] = True
    IGNORED: typing.ClassVar[frozenset[str]] = frozenset(
        {
            "alg_name",
            "model_name",
            "device",
            "model_parallel",
            "rewrite_module_tmp",
            "layer_module_tmp",
            "mlp_module_tmp",
            "attn_module_tmp",
            "ln_f_module",
            "lm_head_module",
            "stats_dir",
            "fp16",
            "max_length",
        }
    )

    @classmethod
    def field_help(cls) -> dict[str, tuple[Any, str]]:
        """Each field's default and help text, for the CLI and the docs."""
        out = {}
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            out[f.name] = (default, f.metadata.get("help", ""))
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], method: str = "") -> HyperParams:
        """Build from a dict, accepting EasyEdit key names; unknown keys raise a clear error, and
        so does an EasyEdit `alg_name` of another method than `method`."""
        if method and "alg_name" in values:
            named = method_for_alg_name(values["alg_name"], values)
            if named != method:
                raise ValueError(
                    f"alg_name: {values['alg_name']!r} is EasyEdit's name of method {named!r}, "
                    f"but these hyper-parameters are for {method!r}; use method {named!r} or "
                    "drop alg_name"
                )
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = cls.ALIASES.get(key, key)
            if name in known:
                kwargs[name] = _coerce(method, name, value, known[name].type)
            elif key not in cls.IGNORED:
                raise ValueError(
                    f"{method or cls.__name__}: unknown hyper-parameter {key!r}; known: "
                    f"{', '.join(sorted(known))}"
                )
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        """Check value ranges; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# EasyEdit's FT is one algorithm; its `objective_optimization` picks what kedit calls FT-L or FT-M.
FT_OBJECTIVES = {"prompt_last": "ft-l", "target_new": "ft-m"}


def name_key(name: str) -> str:
    """A method or algorithm name reduced to lower-case letters and digits ("R-ROME" -> "rrome")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def method_for_alg_name(alg_name: Any, values: dict[str, Any]) -> str:
    """The kedit method an EasyEdit `alg_name` (and, for FT, `objective_optimization`) means."""
    if not isinstance(alg_name, str):
        raise ValueError(f"alg_name: expected the EasyEdit algorithm name, got {alg_name!r}")
    key = name_key(alg_name)
    if key == "ft":
        objective = values.get("objective_optimization", "prompt_last")
        if objective not in FT_OBJECTIVES:
            raise ValueError(
                f"objective_optimization: expected one of {list(FT_OBJECTIVES)}, got {objective!r}"
            )
        return FT_OBJECTIVES[objective]
    for method in list_methods():
        if name_key(method) == key:
            return method
    raise ValueError(
        f"alg_name: {alg_name!r} is not a method kedit has; kedit's methods: "
        f"{', '.join(list_methods())}"
    )


def _coerce(method: str, name: str, value: Any, annotation: Any) -> Any:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    options = [part.strip() for part in text.split("|")]
    if value is None and "None" in options:
        return None
    base = options[0]
    where = f"{method}.{name}" if method else name
    try:
        if base == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base.startswith("list[int]"):
            items = [value] if isinstance(value, int) else list(value)
            if any(isinstance(v, bool) or int(v) != v for v in items):
                raise TypeError
            return [int(v) for v in items]
        if base == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {text}, got {value!r}") from None
    return value


@dataclass
class MethodResult:
    """What a method computed; `kedit.edit` turns it into an `Edit`."""

    deltas: list[WeightDelta]
    info: dict[str, Any] = field(default_factory=dict)


class MethodState:
    """What a stateful method carries from one edit to the next (AlphaEdit: the keys of earlier
    edits). Held by a `kedit.Session` or passed to `kedit.edit(state=...)`, never global.

    Subclasses assign new values to their attributes instead of changing them in place, so
    that a shallow copy is a snapshot (the values can be large tensors).
    """

    def reset(self) -> None:
        """Forget everything, as at the start of a session."""
        raise NotImplementedError

    @contextmanager
    def rollback_on_error(self) -> Iterator[None]:
        """Restore the state as it was if the block raises, so a failed edit leaves no trace."""
        saved = dict(vars(self))
        try:
            yield
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise


MethodFn = (
    Callable[[LM, list[EditRequest], HyperParams], MethodResult]
    | Callable[[LM, list[EditRequest], HyperParams, MethodState], MethodResult]
)

# Computes, for each request on its own, the update that editing the unchanged model with that
# request alone would give: many requests at once where the method can batch the work.
EachFn = Callable[[LM, list[EditRequest], HyperParams], list[MethodResult]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MethodFn
    hparams: type[HyperParams]
    summary: str
    batchable: bool
    defaults: str
    state: type[MethodState] | None = None
    each: EachFn | None = None


_METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    hparams: type[HyperParams],
    summary: str,
    batchable: bool = False,
    defaults: str | None = None,
    state: type[MethodState] | None = None,
    each: EachFn | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register a method function under `name` (lower case, e.g. "rome").

    The function is called as `fn(lm, requests, hparams)`, or `fn(lm, requests, hparams, state)`
    when `state` names the method's `MethodState` class. `batchable` methods edit many requests
    in one update; `defaults` names the method's group in the model table
    (`hparams/models.yaml`; the method's name by default). `each`, where given, computes
    independent single-request edits many at a time (see `kedit.edit_each`).
    """

    def decorator(fn: MethodFn) -> MethodFn:
        spec = MethodSpec(name, fn, hparams, summary, batchable, defaults or name, state, each)
        _METHODS[name] = spec
        return fn

    return decorator


def _load_builtin_methods() -> None:
    from kedit.methods import (  # noqa: F401  (registration happens on import)
        alphaedit,
        dinm,
        dpo,
        emmet,
        ft,
        grace,
        ike,
        kn,
        lora,
        malmen,
        melo,
        memit,
        mend,
        pmet,
        rome,
        serac,
        ultraedit,
        wise,
    )


def list_methods() -> list[str]:
    """Names of the registered editing methods."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key not in _METHODS:
        raise ValueError(f"method: unknown method {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[key]


def check_targets(spec: MethodSpec, requests: list[EditRequest]) -> None:
    """Refuse requests with `extra_targets` for a method that edits towards one target only."""
    if spec.hparams.MULTI_LABEL:
        return
    for index, request in enumerate(requests):
        if request.extra_targets:
            takers = [m for m in list_methods() if _METHODS[m].hparams.MULTI_LABEL]
            raise ValueError(
                f"requests[{index}].extra_targets: method {spec.name!r} edits towards one "
                f"target; Multi-Label Edit needs one of {', '.join(takers)}"
            )


def model_defaults(method: str, lm: LM) -> dict[str, Setting]:
    """The values the model table (`kedit.hparams`) gives `method` on `lm` beyond its dataclass,
    with their sources; a method with statistics also gets the model's default corpus."""
    spec = get_method(method)
    if not spec.hparams.PER_MODEL:
        return {}
    settings = model_settings(spec.name, spec.defaults, lm)
    fields = {f.name for f in dataclasses.fields(spec.hparams)}
    if "mom2_corpus" in fields and "mom2_corpus" not in settings:
        settings["mom2_corpus"] = corpus_setting(lm)
    return settings


def default_hparams(method: str, lm: LM) -> dict[str, Any]:
    """The values of `model_defaults`, without their sources."""
    return {name: copy.deepcopy(s.value) for name, s in model_defaults(method, lm).items()}


def explain_hparams(
    method: str, lm: LM, overrides: dict[str, Any] | None = None
) -> dict[str, Setting]:
    """Every hyper-parameter `resolve_hparams` gives, with where its value came from: the
    user's override, the model table (with the entry's source), relative depth, the model's
    default corpus, or the dataclass default."""
    spec = get_method(method)
    values = resolve_hparams(spec.name, lm, overrides).to_dict()
    given = {spec.hparams.ALIASES.get(key, key) for key in overrides or {}}
    settings = model_defaults(spec.name, lm)
    return {
        name: Setting(
            value, OVERRIDE if name in given else getattr(settings.get(name), "source", DEFAULT)
        )
        for name, value in values.items()
    }


def resolve_hparams(
    method: str, lm: LM, overrides: dict[str, Any] | HyperParams | None = None
) -> HyperParams:
    """Defaults for this model, updated by the user's overrides, validated."""
    spec = get_method(method)

    def locate(defaults: dict[str, Any]) -> list[int]:
        return auto_layers(lm, single=_edits_one_layer(spec, defaults))

    return resolve_with_defaults(
        spec.hparams,
        spec.name,
        overrides,
        lambda: default_hparams(spec.name, lm),
        locate if "layers" in spec.hparams.field_help() else None,
    )


def resolve_with_defaults(
    hparams: type[HyperParams],
    method: str,
    overrides: dict[str, Any] | HyperParams | None,
    defaults: Callable[[], dict[str, Any]],
    locate: Callable[[dict[str, Any]], list[int]] | None = None,
) -> HyperParams:
    """`method`'s hyper-parameters: `overrides` themselves where they are an `hparams` instance
    (validated), else `defaults()` (the model table's values for the model) updated by the
    `overrides` dict and built. Where `locate` is given, `layers: auto` becomes the layers it
    finds from the defaults."""
    if isinstance(overrides, HyperParams):
        if not isinstance(overrides, hparams):
            raise ValueError(
                f"hparams: {type(overrides).__name__} given for method {method!r}, "
                f"expected {hparams.__name__}"
            )
        overrides.validate()
        return overrides
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"hparams: expected a dict or {hparams.__name__}, got {overrides!r}")
    table = defaults()
    values = {**table, **(overrides or {})}
    if locate is not None and values.get("layers") == AUTO_LAYERS:
        values["layers"] = locate(table)
    return hparams.from_dict(values, method)


AUTO_LAYERS = "auto"


def _edits_one_layer(spec: MethodSpec, defaults: dict[str, Any]) -> bool:
    """Whether a method's default layers are one layer: `layers: auto` (the layers causal
    tracing locates, `kedit.analysis.locate`) then gives the peak, else MEMIT's window."""
    default = defaults.get("layers", spec.hparams.field_help()["layers"][0])
    return default is not None and len(default) == 1
