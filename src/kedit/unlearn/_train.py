"""The optimisation every unlearning method runs; a method supplies only its loss.

Items become rows of token ids whose answer tokens are scored teacher-forced (FT-M's batches,
`kedit.methods._rows`). Each step takes the next batch of forget items and, where the method
uses it, of retain items; every `eval_every` steps the forget and retain sets' token
accuracies are measured (the curves) and training stops once the forget accuracy reaches
`stop_forget_acc`. The weights train as float32 copies written back in the model's dtype
(`mixed_precision_step`, as FT's), either the chosen matrices themselves or rank-r LoRA
adapters on them (peft). At the end (and on any error) the model is restored exactly, adapters
removed, and the change is returned as weight deltas: dense, or low-rank `B A` factors for LoRA.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit.data.unlearn_items import UnlearnItem
from kedit.edits import WeightDelta
from kedit.hooks import capture, stop_after
from kedit.lm import LM
from kedit.methods._rows import TargetBatch, TargetRow, batch_rows, target_logp
from kedit.methods._train import mixed_precision_step
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult

FORGET, RETAIN = "forget", "retain"
CURVE_RETAIN_ITEMS = 128  # the curves' retain accuracy is measured on the first this many items


def encode_row(lm: LM, prompt: str, answer_ids: list[int]) -> TargetRow:
    """The token ids of `prompt + answer`, without the answer's last token, the positions that
    predict the answer tokens and their ids (teacher forcing)."""
    prompt_ids = lm.encode_prompt(prompt)
    row = prompt_ids + answer_ids[:-1]
    return TargetRow(row, list(range(len(prompt_ids) - 1, len(row))), answer_ids, 1.0, 0.0)


def check_fits(lm: LM, items: Sequence[UnlearnItem], field_name: str, extra: int = 0) -> None:
    """Refuse, naming it, an item whose prompt and longest answer (plus `extra` tokens) exceed
    the model's context."""
    limit = lm.context_length
    if not limit:
        return
    for index, item in enumerate(items):
        answers = [item.answer, item.paraphrased_answer or item.answer, *item.perturbed]
        length = len(lm.encode_prompt(item.prompt)) + max(len(lm.encode(a)) for a in answers)
        if length + extra > limit:
            raise ValueError(
                f"{field_name}[{index}]: prompt and answer take {length + extra} tokens, more "
                f"than {lm.name}'s context of {limit}"
            )


def item_rows(lm: LM, items: Sequence[UnlearnItem], field_name: str) -> list[TargetRow]:
    """Each item's row; an item longer than the model's context raises an error naming it."""
    check_fits(lm, items, field_name)
    rows = []
    for index, item in enumerate(items):
        answer = lm.encode(item.answer)
        if not answer:
            raise ValueError(f"{field_name}[{index}]: the answer {item.answer!r} has no tokens")
        rows.append(encode_row(lm, item.prompt, answer))
    return rows


def batches_of(
    lm: LM, rows: list[TargetRow], size: int, order: random.Random | None
) -> list[TargetBatch]:
    """The rows in batches of `size`, shuffled by `order` (kept in order when None)."""
    index = list(range(len(rows)))
    if order is not None:
        order.shuffle(index)
    return [
        batch_rows(lm, [rows[i] for i in index[start : start + size]])
        for start in range(0, len(index), size)
    ]


def answer_logprobs(model: nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Log-probabilities `[rows, answer tokens, vocabulary]` at the answer positions."""
    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    rows = torch.arange(len(batch.ids), device=logits.device)[:, None]
    return torch.log_softmax(logits[rows, batch.positions.to(logits.device)].float(), dim=-1)


def block_output(model: nn.Module, batch: TargetBatch, block: str) -> torch.Tensor:
    """The residual stream after `block` `[rows, positions, width]` in float32, the forward
    pass stopped there (with gradients where the model has them)."""
    with capture(model, [block], detach=False) as seen, stop_after(model, block):
        model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    return seen[block].float()


@torch.no_grad()
def mean_token_accuracy(model: nn.Module, batches: list[TargetBatch]) -> float:
    """The mean over rows of each row's share of answer tokens that are the argmax."""
    shares = []
    for batch in batches:
        logprobs = answer_logprobs(model, batch)
        valid = batch.valid.to(logprobs.device)
        hits = (logprobs.argmax(-1) == batch.targets.to(logprobs.device)) & valid
        shares.append(hits.sum(1) / valid.sum(1))
    return float(torch.cat(shares).mean())


class Step:
    """One optimisation step: its forget and retain batches, one forward pass each on first
    use, and the unedited model's values for them where the method asked for references."""

    def __init__(
        self,
        model: nn.Module,
        batches: dict[str, TargetBatch | None],
        references: dict[str, torch.Tensor | None],
        number: int,
    ) -> None:
        self.model = model
        self.batches = batches
        self.references = references
        self.number = number
        self._logprobs: dict[str, torch.Tensor] = {}
        self._activations: dict[str, torch.Tensor] = {}

    def batch(self, which: str) -> TargetBatch:
        batch = self.batches.get(which)
        if batch is None:
            raise ValueError(f"this method's loss needs a {which} set, and there is none")
        return batch

    def logprobs(self, which: str) -> torch.Tensor:
        """`[rows, answer tokens, vocabulary]` log-probabilities (with gradients)."""
        if which not in self._logprobs:
            self._logprobs[which] = answer_logprobs(self.model, self.batch(which))
        return self._logprobs[which]

    def activations(self, which: str, block: str) -> torch.Tensor:
        """`block_output` of the set's batch (with gradients)."""
        key = f"{which} after {block}"
        if key not in self._activations:
            self._activations[key] = block_output(self.model, self.batch(which), block)
        return self._activations[key]

    def logp_sum(self, which: str) -> torch.Tensor:
        """Each row's log-probability of its whole answer, log π(y|x)."""
        return target_logp(self.logprobs(which), self.batch(which)).sum(1)

    def lengths(self, which: str) -> torch.Tensor:
        """Each row's number of answer tokens, |y|."""
        return self.batch(which).valid.sum(1).to(self.logprobs(which).device)

    def nll(self, which: str) -> torch.Tensor:
        """Each row's mean answer-token negative log-likelihood."""
        return -self.logp_sum(which) / self.lengths(which)

    def reference(self, which: str) -> torch.Tensor:
        value = self.references.get(which)
        if value is None:
            raise ValueError(f"this method's loss needs references on the {which} set")
        return value


def retain_term(step: Step, weight: float) -> torch.Tensor | float:
    """λ · E_R[NLL(y | x)] on the step's retain batch; 0 where λ is 0 or there is no retain set."""
    if weight == 0 or step.batches.get(RETAIN) is None:
        return 0.0
    return weight * step.nll(RETAIN).mean()


LossFn = Callable[[Step], torch.Tensor]


# What a method may ask to be computed on the unedited model, for each batch: the forget rows'
# answer log-probability ("forget": NPO) or the retain rows' full distributions ("retain": KL).
def _answer_logp(model: nn.Module, batch: TargetBatch) -> torch.Tensor:
    return target_logp(answer_logprobs(model, batch), batch).sum(1)


Reference = Callable[[nn.Module, TargetBatch], torch.Tensor]
REFERENCES: dict[str, Reference] = {FORGET: _answer_logp, RETAIN: answer_logprobs}


def weight_modules(lm: LM, parts: str, layers: list[int] | None) -> list[str]:
    """The weight matrices (modules with a 2-D `weight`) of the chosen blocks' attention ('attn'),
    MLP ('mlp') or both ('all'), by module name."""
    chosen = range(lm.n_layers) if layers is None else [lm.check_layer(x) for x in layers]
    roots = []
    for layer in chosen:
        if parts in ("all", "attn"):
            roots.append(lm.layout.attn_name(layer))
        if parts in ("all", "mlp"):
            roots.append(lm.layout.mlp_name(layer))
    names = []
    for root in roots:
        for name, module in lm.model.get_submodule(root).named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 2:
                names.append(f"{root}.{name}" if name else root)
    return names


@dataclass
class _Trained:
    """The tensors one run trains: the model's own (`params`) and their float32 copies."""

    params: list[nn.Parameter]
    masters: list[torch.Tensor]
    originals: list[torch.Tensor]
    deltas: Callable[[], list[WeightDelta]]


@contextmanager
def keep_requires_grad(model: nn.Module) -> Iterator[None]:
    """Every parameter's `requires_grad` as it was after the block."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


@contextmanager
def _full_weights(lm: LM, modules: list[str]) -> Iterator[_Trained]:
    """Train the modules' weights in place; restored on exit."""
    names = [f"{module}.weight" for module in modules]
    params = [lm.model.get_parameter(name) for name in names]
    originals = [p.detach().clone() for p in params]
    masters = [p.detach().float().clone() for p in params]
    trained = {id(p) for p in params}
    for p in lm.model.parameters():
        p.requires_grad_(id(p) in trained)

    def deltas() -> list[WeightDelta]:
        return [
            WeightDelta.from_dense(name, master - original.float())
            for name, master, original in zip(names, masters, originals, strict=True)
        ]

    try:
        yield _Trained(params, masters, originals, deltas)
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
                p.grad = None


def lora_delta(
    module: str, a: torch.Tensor, b: torch.Tensor, scale: float, conv1d: bool
) -> WeightDelta:
    """LoRA's change of a module's weight, scale · B A (A: r × in, B: out × r), as low-rank
    factors; transposed for a Conv1D weight, stored (in, out)."""
    left, right = (a.T, b.T * scale) if conv1d else (b * scale, a)
    return WeightDelta.low_rank(f"{module}.weight", left, right)


@contextmanager
def _lora_adapters(lm: LM, modules: list[str], hparams: UnlearnHyperParams) -> Iterator[_Trained]:
    """Wrap the modules in rank-r LoRA adapters (peft; B starts at zero, so the model is
    unchanged until the first step) and train those; removed on exit."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError(
            "lora_rank: LoRA unlearning needs peft (pip install peft, or 'kedit[lora]')"
        ) from error
    config = LoraConfig(
        r=hparams.lora_rank,
        lora_alpha=hparams.lora_alpha,
        lora_dropout=0.0,
        target_modules=modules,
        fan_in_fan_out=lm.layout.conv1d,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(hparams.seed)
        # transformers 5 deprecates an attribute peft reads; nothing for the user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        wrapped = get_peft_model(lm.model, config)
    try:
        layers = [lm.model.get_submodule(module) for module in modules]
        pairs = [
            (layer.lora_A["default"].weight, layer.lora_B["default"].weight) for layer in layers
        ]
        params = [p for pair in pairs for p in pair]
        masters = [p.detach().float().clone() for p in params]
        scales = [layer.scaling["default"] for layer in layers]

        def deltas() -> list[WeightDelta]:
            return [
                lora_delta(module, masters[2 * i], masters[2 * i + 1], scale, lm.layout.conv1d)
                for i, (module, scale) in enumerate(zip(modules, scales, strict=True))
            ]

        yield _Trained(params, masters, [p.detach().clone() for p in params], deltas)
    finally:
        wrapped.unload()


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("forget acc {task.fields[forget]:.3f}"),
        transient=True,
        disable=not enabled,
    )


def run_unlearning(
    lm: LM,
    name: str,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: UnlearnHyperParams,
    loss: LossFn,
    *,
    references: Collection[str] | Mapping[str, Reference] = (),
    modules: list[str] | None = None,
    forget_answers: list[list[int]] | None = None,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> UnlearnResult:
    """Minimise `loss` over the forget (and retain) batches; return the change, model unchanged.

    `references` names the sets whose `REFERENCES` value the loss reads (`Step.reference`), or
    maps a set to the function that computes it on the unedited model, batch by batch.
    `modules` are the weight matrices to train (default: `weight_modules` of `hparams.parts`
    and `hparams.layers`); `forget_answers` replaces the forget items' answer token ids in
    training (random labels), while the curves and the early stop still score the true answers.
    """
    order = random.Random(hparams.seed)
    forget_rows = item_rows(lm, forget, "forget")
    retain_rows = item_rows(lm, retain, "retain") if retain else []
    train_rows = forget_rows
    if forget_answers is not None:
        train_rows = [
            encode_row(lm, item.prompt, answer)
            for item, answer in zip(forget, forget_answers, strict=True)
        ]
    size = hparams.batch_size
    train = {
        FORGET: batches_of(lm, train_rows, size, order),
        RETAIN: batches_of(lm, retain_rows, size, order) if retain_rows else [],
    }
    scored = {
        FORGET: batches_of(lm, forget_rows, size, None),
        RETAIN: batches_of(lm, retain_rows[:CURVE_RETAIN_ITEMS], size, None) if retain else [],
    }
    if not isinstance(references, Mapping):
        references = {which: REFERENCES[which] for which in references}
    with torch.no_grad():
        refs = {
            which: [reference(lm.model, batch) for batch in train[which]]
            for which, reference in references.items()
        }
    modules = modules if modules is not None else weight_modules(lm, hparams.parts, hparams.layers)
    if not modules:
        raise ValueError(f"parts, layers: no weight matrices to train in {lm.name}")
    curve: list[dict[str, float]] = []
    steps_run, stopped = 0, False
    trainable = _lora_adapters(lm, modules, hparams) if hparams.lora_rank else None
    with keep_requires_grad(lm.model), trainable or _full_weights(lm, modules) as trained:
        optimizer = torch.optim.Adam(trained.masters, lr=hparams.lr)
        with _progress(progress) as bar:
            task = bar.add_task(
                f"{name} unlearning {lm.name}", total=hparams.steps, forget=float("nan")
            )
            for step in range(hparams.steps + 1):
                if step % hparams.eval_every == 0 or step == hparams.steps:
                    point = {
                        "step": step,
                        "forget_acc": mean_token_accuracy(lm.model, scored[FORGET]),
                    }
                    if scored[RETAIN]:
                        point["retain_acc"] = mean_token_accuracy(lm.model, scored[RETAIN])
                    curve.append(point)
                    bar.update(task, completed=step, forget=point["forget_acc"])
                    target = hparams.stop_forget_acc
                    if target is not None and point["forget_acc"] <= target:
                        stopped = True
                        break
                if step == hparams.steps:
                    break
                batches = {
                    which: train[which][step % len(train[which])] if train[which] else None
                    for which in (FORGET, RETAIN)
                }
                step_refs = {
                    which: refs[which][step % len(refs[which])] if which in refs else None
                    for which in (FORGET, RETAIN)
                }
                value = loss(Step(lm.model, batches, step_refs, step))
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"{name}: the loss is {value.item()} at step {step}; lower lr"
                    )
                for p in trained.params:
                    p.grad = None
                value.backward()
                mixed_precision_step(
                    trained.params, trained.masters, trained.originals, optimizer, None
                )
                curve[-1].setdefault("loss", value.item())
                steps_run = step + 1
        deltas = trained.deltas()
    return UnlearnResult(
        deltas,
        {
            **(info or {}),
            "steps": steps_run,
            "stopped_early": stopped,
            "modules": modules,
            "curve": curve,
        },
    )
