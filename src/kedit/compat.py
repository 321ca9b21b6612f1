"""EasyEdit compatibility: EasyEdit's hyper-parameter files and its `BaseEditor` API, on kedit.

An EasyEdit script runs with only its import changed::

    from kedit.compat import BaseEditor, ROMEHyperParams

    hparams = ROMEHyperParams.from_hparams("hparams/ROME/gpt2-xl.yaml")
    editor = BaseEditor.from_hparams(hparams)
    metrics, edited_model, weights_copy = editor.edit(
        prompts=prompts, target_new=targets, subject=subjects, locality_inputs=locality
    )

There is one `*HyperParams` class per method kedit has (`ROMEHyperParams`,
`R_ROMEHyperParams`, `MEMITHyperParams`, `FTHyperParams` for FT-L and FT-M, and one for each
method registered later, looked up by name). A file's keys are mapped onto the method's kedit
hyper-parameters (EasyEdit names are aliases there); a key with no meaning in kedit is an
error. The metrics are EasyEdit's teacher-forced ones, computed with kedit's batched scoring;
docs/easyedit.md maps their names onto kedit's.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from kedit.api import edit as kedit_edit
from kedit.data._common import flatten_strings, with_space
from kedit.edits import Edit, WeightDelta
from kedit.eval.metrics import fluency_entropy
from kedit.eval.protocols import (
    TokenScore,
    sample_continuations,
    score_teacher_forced,
    teacher_forced_metrics,
)
from kedit.files import read_text
from kedit.lm import LM, load
from kedit.methods._locate import LocateHyperParams
from kedit.methods.ft import FTHyperParams as _KeditFTHyperParams
from kedit.methods.registry import (
    get_method,
    list_methods,
    method_for_alg_name,
    name_key,
    resolve_hparams,
)
from kedit.requests import EditRequest

__all__ = [
    "BaseEditor",
    "EasyEditHyperParams",
    "FTHyperParams",
    "MEMITHyperParams",
    "R_ROMEHyperParams",
    "ROMEHyperParams",
]

log = logging.getLogger("kedit.compat")
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# EasyEdit keys that this module handles itself rather than the method's hyper-parameters.
HANDLED_HERE = {"alg_name", "batch_size", "objective_optimization"}
# `edit` keyword arguments EasyEdit scripts pass that change nothing here: the in-context
# training set (IKE only), and the weight-keeping switches EasyEdit itself no longer reads.
IGNORED_KWARGS = {"train_ds", "keep_original_weight", "copy", "return_orig_weights"}
TOKEN_ACCURACY_METRICS = {"token_em", "exact match"}
NO_GROUND_TRUTH = "<|endoftext|>"


class EasyEditHyperParams:
    """Hyper-parameters in EasyEdit's form, read from its YAML files and checked against the
    kedit method they map onto. Every key of the file is an attribute (`hparams.layers`)."""

    ALG_NAMES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **config: Any) -> None:
        values = {
            key: float(value) if isinstance(value, str) and SCIENTIFIC.fullmatch(value) else value
            for key, value in config.items()
        }
        object.__setattr__(self, "config", values)
        self.validate()

    @classmethod
    def from_hparams(cls, path: str | Path) -> EasyEditHyperParams:
        """Read an EasyEdit hyper-parameter file (".yaml" is added when the name lacks it)."""
        path = Path(path).expanduser()
        if not path.is_file() and ".yaml" not in path.name:
            path = path.with_name(path.name + ".yaml")
        config = yaml.safe_load(read_text(path, "hparams"))
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of hyper-parameters, got {config!r:.80}")
        try:
            return cls(**config)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config", {})
        if name in config:
            return config[name]
        raise AttributeError(f"{type(self).__name__} has no hyper-parameter {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self.config[name] = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @property
    def method(self) -> str:
        """The kedit method these hyper-parameters drive."""
        return method_for_alg_name(self.config["alg_name"], self.config)

    def kedit_values(self) -> dict[str, Any]:
        """The keys that go to the method's kedit hyper-parameters, in kedit's conventions."""
        values = {k: v for k, v in self.config.items() if k not in HANDLED_HERE}
        if values.get("norm_constraint") is False:  # EasyEdit's FT writes "off" as false
            values["norm_constraint"] = None
        fields = get_method(self.method).hparams.field_help()
        if "v_weight_decay" in values and "v_weight_decay_form" in fields:
            values.setdefault("v_weight_decay_form", "easyedit")  # the term its weight is for
        return values

    def validate(self) -> None:
        """Check the algorithm, the model and every key against the kedit method."""
        method = method_for_alg_name(self.config.get("alg_name"), self.config)
        alg_name = self.config["alg_name"]
        if self.ALG_NAMES and name_key(alg_name) not in self.ALG_NAMES:
            raise ValueError(
                f"alg_name: {type(self).__name__} reads files of {'/'.join(self.ALG_NAMES)}, "
                f"got {alg_name!r}; use the class of that algorithm"
            )
        model = self.config.get("model_name")
        if not isinstance(model, LM) and not (isinstance(model, str) and model):
            raise ValueError(
                f"model_name: expected a bundled model name, a folder or a hub id, got {model!r}"
            )
        batch_size = self.config.get("batch_size", 1)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        spec = get_method(method)
        spec.hparams.from_dict(self.kedit_values(), spec.name)


_CLASSES: dict[str, type[EasyEditHyperParams]] = {}


def _hparams_class(name: str, alg_names: tuple[str, ...]) -> type[EasyEditHyperParams]:
    if name not in _CLASSES:
        doc = f"EasyEdit hyper-parameters of {'/'.join(alg_names)}, on kedit."
        attrs = {"ALG_NAMES": alg_names, "__doc__": doc, "__module__": __name__}
        _CLASSES[name] = type(name, (EasyEditHyperParams,), attrs)
    return _CLASSES[name]


ROMEHyperParams = _hparams_class("ROMEHyperParams", ("rome",))
R_ROMEHyperParams = _hparams_class("R_ROMEHyperParams", ("rrome",))
MEMITHyperParams = _hparams_class("MEMITHyperParams", ("memit",))
FTHyperParams = _hparams_class("FTHyperParams", ("ft", "ftl", "ftm"))


def __getattr__(name: str) -> type[EasyEditHyperParams]:
    """`<Method>HyperParams` for any method registered with kedit (e.g. later additions)."""
    for suffix in ("HyperParams", "Hparams"):
        if name.endswith(suffix) and name[: -len(suffix)]:
            key = name_key(name[: -len(suffix)])
            if any(name_key(method) == key for method in list_methods()):
                return _hparams_class(name, (key,))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _device(value: Any) -> str | None:
    """EasyEdit's `device` (a GPU index) as a torch device; CPU when no such GPU exists."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"device: expected a GPU index or a torch device name, got {value!r}")
    if torch.cuda.is_available() and value < torch.cuda.device_count():
        return f"cuda:{value}"
    log.warning("device: GPU %d is not available; running on the CPU", value)
    return None


def _check_rewrite_module(lm: LM, method: str, template: Any, params: Any) -> None:
    """EasyEdit's `rewrite_module_tmp` must name the module that kedit's method edits."""
    if template is None or not isinstance(params, (LocateHyperParams, _KeditFTHyperParams)):
        return
    for layer in params.layers:
        named = str(template).format(lm.check_layer(layer)).removesuffix(".weight")
        expected = lm.layout.mlp_out_name(layer)
        if named != expected:
            raise ValueError(
                f"rewrite_module_tmp: {template!r} names {named!r}, but {method} edits the MLP "
                f"output projection, {expected!r} in this model; point the template there or "
                "remove the key"
            )


def _per_case(name: str, value: Any, n: int, optional: bool = True) -> list[Any]:
    """One entry per edit: a list of n entries, or a single value when there is one edit."""
    if value is None and optional:
        return [None] * n
    if isinstance(value, (str, dict)) or value is None:
        value = [value]
    if not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"{name}: expected {n} entries (one per prompt), got {value!r:.120}")
    return list(value)


def _texts(name: str, value: Any) -> list[Any]:
    """A per-edit entry (a string, or a list) as a list; None means nothing."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"{name}: expected a string or a list, got {value!r:.80}")
    return items


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r:.80}")
    return value


@dataclass(frozen=True)
class _Probes:
    """One key of an edit's locality or portability inputs: the prompts, their answers (with
    the leading space), and the entry as the user gave it (for `requested_rewrite`)."""

    prompts: list[str]
    answers: list[str]
    given: dict[str, Any]


def _probe_inputs(name: str, inputs: dict[str, Any] | None, n: int) -> list[dict[str, _Probes]]:
    """EasyEdit's {key: {"prompt": [...], "ground_truth": [...]}} (one entry per edit, each a
    string or a list) as, per edit, {key: _Probes}; an edit whose entry is None or "" has no
    probe of that key. An answer given as a list of aliases is scored with its first one."""
    per_edit: list[dict[str, _Probes]] = [{} for _ in range(n)]
    if inputs is None:
        return per_edit
    if not isinstance(inputs, dict):
        raise ValueError(f"{name}: expected {{key: {{'prompt': ..., 'ground_truth': ...}}}}")
    for key, entry in inputs.items():
        where = f"{name}[{key!r}]"
        if not isinstance(entry, dict) or not {"prompt", "ground_truth"} <= entry.keys():
            raise ValueError(f"{where}: expected {{'prompt': ..., 'ground_truth': ...}}")
        prompts = _per_case(f"{where}['prompt']", entry["prompt"], n, optional=False)
        truths = _per_case(f"{where}['ground_truth']", entry["ground_truth"], n, optional=False)
        for i, (prompt, truth) in enumerate(zip(prompts, truths, strict=True)):
            asked = _texts(f"{where}['prompt'][{i}]", prompt)
            answers = [truth] if len(asked) == 1 else _texts(f"{where}['ground_truth'][{i}]", truth)
            if len(answers) != len(asked):
                raise ValueError(
                    f"{where}['ground_truth'][{i}]: expected {len(asked)} answers, one per "
                    f"prompt, got {truth!r:.80}"
                )
            pairs = [(p, flatten_strings(a)[0]) for p, a in zip(asked, answers, strict=True) if p]
            if pairs:
                per_edit[i][key] = _Probes(
                    [_text(f"{where}['prompt'][{i}]", p) for p, _ in pairs],
                    [with_space(_text(f"{where}['ground_truth'][{i}]", a), True) for _, a in pairs],
                    {"prompt": prompt, "ground_truth": truth},
                )
    return per_edit


@dataclass
class _Case:
    """One edit as EasyEdit describes it (`requested`) and as kedit runs it (`request`)."""

    requested: dict[str, Any]
    request: EditRequest
    locality: dict[str, _Probes]
    portability: dict[str, _Probes]

    def pairs(self) -> list[tuple[str, str]]:
        """Every (prompt, answer) scored for this case, in `regroup`'s order."""
        target = self.request.target_new
        out = [(self.request.text, target)] + [(p, target) for p in self.request.rephrase]
        for groups in (self.locality, self.portability):
            for probes in groups.values():
                out += list(zip(probes.prompts, probes.answers, strict=True))
        return out

    def regroup(self, scores: list[TokenScore]) -> dict[tuple[str, str], list[TokenScore]]:
        """The scores of `pairs()` per probe set: `("rewrite", "")`, `("rephrase", "")`, and
        `("locality", key)`, `("portability", key)` for each key of those inputs."""
        it = iter(scores)
        out = {
            ("rewrite", ""): [next(it)],
            ("rephrase", ""): [next(it) for _ in self.request.rephrase],
        }
        for name in ("locality", "portability"):
            for key, probes in getattr(self, name).items():
                out[name, key] = [next(it) for _ in probes.prompts]
        return out


@dataclass(frozen=True)
class _Scores:
    """One case's scores at one stage: per probe set (`_Case.regroup`), and its fluency."""

    probes: dict[tuple[str, str], list[TokenScore]]
    fluency: dict[str, float] | None


def _build_case(
    i: int,
    prompt: Any,
    target: Any,
    truth: Any,
    rephrase: Any,
    subject: Any,
    locality: dict[str, _Probes],
    portability: dict[str, _Probes],
) -> _Case:
    """Edit i as a kedit request (targets and answers with their leading space) and as the
    `requested_rewrite` EasyEdit reports."""
    prompt = _text(f"prompts[{i}]", prompt)
    target = _text(f"target_new[{i}]", target)
    rephrased = [r for r in _texts(f"rephrase_prompts[{i}]", rephrase) if r]
    try:
        request = EditRequest(
            prompt=prompt,
            subject=prompt if subject is None else subject,
            target_new=with_space(target, True),
            target_true=None if truth is None else with_space(_text("ground_truth", truth), True),
            rephrase=rephrased,
            locality=[p for g in locality.values() for p in zip(g.prompts, g.answers, strict=True)],
            portability=[
                p for g in portability.values() for p in zip(g.prompts, g.answers, strict=True)
            ],
            case_id=i,
        )
    except ValueError as exc:
        raise ValueError(f"edit {i} ({prompt!r:.60}): {exc}") from exc
    requested = {
        "prompt": prompt,
        "target_new": target,
        "ground_truth": NO_GROUND_TRUTH if truth is None else truth,
        "portability": {key: probes.given for key, probes in portability.items()},
        "locality": {key: probes.given for key, probes in locality.items()},
    }
    if subject is not None:
        requested["subject"] = subject
    if rephrase is not None:
        requested["rephrase_prompt"] = rephrase
    return _Case(requested, request, locality, portability)


class BaseEditor:
    """EasyEdit's editor on kedit: edits prompts, measures EasyEdit's metrics before and after,
    and restores the model (unless `sequential_edit`), as EasyEdit's `BaseEditor` does.

    `.lm` is the kedit model, `.edits` the kedit `Edit`s of the last call.
    """

    def __init__(self, hparams: EasyEditHyperParams) -> None:
        if not isinstance(hparams, EasyEditHyperParams):
            raise TypeError(
                f"hparams: expected an EasyEdit hyper-parameter object from kedit.compat (e.g. "
                f"ROMEHyperParams.from_hparams(path)), got {type(hparams).__name__}"
            )
        hparams.validate()
        self.hparams = hparams
        self.alg_name = hparams.alg_name
        self.model_name = hparams.model_name
        config = hparams.config
        if isinstance(config["model_name"], LM):
            self.lm = config["model_name"]
        else:
            dtype = torch.float16 if config.get("fp16") else None
            self.lm = load(config["model_name"], device=_device(config.get("device")), dtype=dtype)
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self.method = hparams.method
        self.params = resolve_hparams(self.method, self.lm, hparams.kedit_values())
        _check_rewrite_module(self.lm, self.method, config.get("rewrite_module_tmp"), self.params)
        self.edits: list[Edit] = []

    @classmethod
    def from_hparams(cls, hparams: EasyEditHyperParams) -> BaseEditor:
        return cls(hparams)

    def edit(
        self,
        prompts: str | list[str],
        target_new: str | list[str],
        ground_truth: str | list[str] | None = None,
        rephrase_prompts: str | list[Any] | None = None,
        locality_inputs: dict[str, Any] | None = None,
        portability_inputs: dict[str, Any] | None = None,
        subject: str | list[str] | None = None,
        sequential_edit: bool = False,
        verbose: bool = True,
        test_generation: bool = False,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], nn.Module, dict[str, torch.Tensor]]:
        """Edit each prompt to continue with its target and measure EasyEdit's metrics.

        Independently (each edit made, measured and undone), or with `sequential_edit` one
        after another, all kept, then all measured. Returns `(metrics, edited_model,
        weights_copy)` as EasyEdit does: per edit {"case_id", "requested_rewrite", "time",
        "pre": {...}, "post": {...}}; the model; the original values of the edited weights.
        """
        cases = self._cases(
            prompts,
            target_new,
            ground_truth,
            rephrase_prompts,
            locality_inputs,
            portability_inputs,
            subject,
            kwargs,
        )
        size = 1 if sequential_edit else None
        return self._run(cases, size, sequential_edit, verbose, test_generation)

    def batch_edit(
        self,
        prompts: list[str],
        target_new: list[str],
        ground_truth: list[str] | None = None,
        rephrase_prompts: list[Any] | None = None,
        locality_inputs: dict[str, Any] | None = None,
        portability_inputs: dict[str, Any] | None = None,
        subject: list[str] | None = None,
        verbose: bool = True,
        test_generation: bool = False,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], nn.Module, dict[str, torch.Tensor]]:
        """Edit the prompts in batches of the file's `batch_size` (one update per batch, for the
        methods that edit many facts at once), each batch measured and undone."""
        spec = get_method(self.method)
        if not spec.batchable:
            raise ValueError(f"batch_edit: method {self.alg_name!r} edits one fact at a time")
        cases = self._cases(
            prompts,
            target_new,
            ground_truth,
            rephrase_prompts,
            locality_inputs,
            portability_inputs,
            subject,
            kwargs,
        )
        size = self.hparams.config.get("batch_size", len(cases))
        return self._run(cases, size, False, verbose, test_generation)

    def _cases(
        self,
        prompts: Any,
        target_new: Any,
        ground_truth: Any,
        rephrase_prompts: Any,
        locality_inputs: Any,
        portability_inputs: Any,
        subject: Any,
        kwargs: dict[str, Any],
    ) -> list[_Case]:
        """Check the inputs as EasyEdit takes them and build one `_Case` per prompt."""
        for key in kwargs:
            if key not in IGNORED_KWARGS | {"eval_metric"}:
                raise ValueError(
                    f"{key}: not an argument of edit here; besides the named ones it takes "
                    f"eval_metric and (without effect) {', '.join(sorted(IGNORED_KWARGS))}"
                )
        metric = kwargs.get("eval_metric", "token_em")
        if metric not in TOKEN_ACCURACY_METRICS:
            raise ValueError(
                f"eval_metric: only token accuracy ({sorted(TOKEN_ACCURACY_METRICS)}) is measured "
                f"here, got {metric!r}; kedit.evaluate offers the other protocols"
            )
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"prompts: expected a prompt or a non-empty list, got {prompts!r:.80}")
        n = len(prompts)
        subjects = _per_case("subject", subject, n)
        if None in subjects and issubclass(get_method(self.method).hparams, LocateHyperParams):
            raise ValueError(
                f"subject: {self.alg_name} edits at the subject's last token; pass subject= "
                "(one per prompt), as EasyEdit requires"
            )
        columns = zip(
            prompts,
            _per_case("target_new", target_new, n, optional=False),
            _per_case("ground_truth", ground_truth, n),
            _per_case("rephrase_prompts", rephrase_prompts, n),
            subjects,
            _probe_inputs("locality_inputs", locality_inputs, n),
            _probe_inputs("portability_inputs", portability_inputs, n),
            strict=True,
        )
        return [_build_case(i, *row) for i, row in enumerate(columns)]

    def _score(self, cases: list[_Case], fluency: bool) -> list[_Scores]:
        """Teacher-forced scores of every case's probes on the model as it is, in one batched
        call; with `fluency`, the n-gram entropy of a sampled continuation of each prompt."""
        pairs = [case.pairs() for case in cases]
        flat = score_teacher_forced(self.lm, [pair for group in pairs for pair in group])
        out, start = [], 0
        for case, group in zip(cases, pairs, strict=True):
            entropy = None
            if fluency:
                text = case.request.text
                text += sample_continuations(self.lm, [text])[0]
                entropy = {"ngram_entropy": fluency_entropy([text])}
            out.append(_Scores(case.regroup(flat[start : start + len(group)]), entropy))
            start += len(group)
        return out

    def _run(
        self, cases: list[_Case], size: int | None, keep: bool, verbose: bool, fluency: bool
    ) -> tuple[list[dict[str, Any]], nn.Module, dict[str, torch.Tensor]]:
        """Score all cases before editing; then edit them in chunks of `size` (one at a time
        with `size=None`), score each chunk and undo it, or with `keep` edit them all in
        sequence, score them and keep the edits."""
        pre = self._score(cases, fluency)
        step = len(cases) if keep else size or 1
        post: list[_Scores] = []
        seconds: list[float] = []
        weights_copy: dict[str, torch.Tensor] = {}
        self.edits = []
        for start in range(0, len(cases), step):
            chunk = cases[start : start + step]
            began = time.perf_counter()
            made = kedit_edit(
                self.lm, [c.request for c in chunk], self.method, self.params, batch_size=size
            )
            took = time.perf_counter() - began
            seconds += [took / len(chunk) if keep else took] * len(chunk)
            self.edits.append(made)
            post += self._score(chunk, fluency)
            made.undo()
            weights_copy = {
                d.param: self.model.get_parameter(d.param).detach().clone()
                for d in made.deltas
                if isinstance(d, WeightDelta)
            }
            if keep:
                made.apply()
        metrics = []
        for index, case in enumerate(cases):
            metrics.append(
                {
                    "case_id": index,
                    "requested_rewrite": case.requested,
                    "time": seconds[index],
                    "pre": _stage(pre[index], None),
                    "post": _stage(post[index], pre[index]),
                }
            )
            if verbose:
                request = case.request
                log.info("%d: %s -> %s %s", index, request.text, request.target_new, metrics[-1])
        return metrics, self.model, weights_copy


def _stage(scores: _Scores, pre: _Scores | None) -> dict[str, Any]:
    """EasyEdit's metrics of one case at one stage, in its layout: "pre" (`pre=None`: no
    locality, which is measured as agreement with the pre-edit predictions) or "post"."""
    sets = scores.probes
    locality = {name for name in sets if name[0] == "locality"}
    values = teacher_forced_metrics(sets, None if pre is None else pre.probes, locality)
    out: dict[str, Any] = {"rewrite_acc": values["rewrite", ""]}
    if ("rephrase", "") in values:
        out["rephrase_acc"] = values["rephrase", ""]

    def keyed(group: str) -> dict[str, list[float]]:
        return {f"{key}_acc": v for (name, key), v in values.items() if name == group}

    if pre is not None:
        out["locality"] = keyed("locality")
    out["portability"] = keyed("portability")
    if scores.fluency is not None:
        out["fluency"] = scores.fluency
    return out
