"""EasyEdit compatibility: its hyper-parameter files, and its editor API on kedit."""

import json
import runpy

import pytest
import torch

import kedit
import kedit.compat as compat
from kedit.compat import BaseEditor, FTHyperParams, MEMITHyperParams, ROMEHyperParams
from kedit.methods.registry import default_hparams, get_method
from kedit.zoo import DATA_DIR

# EasyEdit's hparams/ROME/gpt2-xl.yaml, pointed at the bundled model and its corpus (fewer
# context prefixes and corpus samples, to keep the test fast).
ROME_YAML = """\
alg_name: "ROME"
model_name: "tiny-gpt2"
stats_dir: "./data/stats"
device: 0
layers: [LAYER]
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 5
v_weight_decay: 0.5
clamp_norm_factor: CLAMP
kl_factor: 0.0625
mom2_adjustment: true
context_template_length_params: [[5, 5]]
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "tinyworld"
mom2_n_samples: 1000
mom2_dtype: "float32"
"""
MEMIT_YAML = """\
alg_name: "MEMIT"
model_name: "tiny-gpt2"
device: 0
layers: [1, 2]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 5
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 20000
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
mom2_dataset: "tinyworld"
mom2_n_samples: 100000
mom2_dtype: "float32"
batch_size: 4
"""
FT_YAML = """\
alg_name: "FT"
model_name: "./hugging_cache/llama-2-7b"
device: 0
layers: [21]
num_steps: 25
batch_size: 1
max_length: 30
lr: 5e-4
weight_decay: 0
kl_factor: 0
norm_constraint: false
objective_optimization: "target_new"
rewrite_module_tmp: "model.layers.{}.mlp.down_proj.weight"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
model_parallel: false
"""

# What an EasyEdit user's KnowEdit script does, with only the import changed.
SCRIPT = """\
import json

from kedit.compat import BaseEditor, ROMEHyperParams

datas = json.load(open(DATA_FILE))
datas = [d for d in datas if d["portability"]["Reasoning"]][:2]
prompts = [d["prompt"] for d in datas]
subjects = [d["subject"] for d in datas]
target_new = [d["target_new"] for d in datas]
ground_truth = [d["ground_truth"] for d in datas]
rephrase_prompts = [d["rephrase"][0] for d in datas]
locality_inputs = {
    "Relation_Specificity": {
        "prompt": [[x["prompt"] for x in d["locality"]["Relation_Specificity"]] for d in datas],
        "ground_truth": [
            [x["ground_truth"] for x in d["locality"]["Relation_Specificity"]] for d in datas
        ],
    }
}
portability_inputs = {
    "reasoning": {
        "prompt": [d["portability"]["Reasoning"][0]["prompt"] for d in datas],
        "ground_truth": [d["portability"]["Reasoning"][0]["ground_truth"] for d in datas],
    }
}

hparams = ROMEHyperParams.from_hparams(HPARAMS_DIR)
editor = BaseEditor.from_hparams(hparams)
metrics, edited_model, _ = editor.edit(
    prompts=prompts,
    ground_truth=ground_truth,
    target_new=target_new,
    subject=subjects,
    rephrase_prompts=rephrase_prompts,
    locality_inputs=locality_inputs,
    portability_inputs=portability_inputs,
    train_ds=None,
    keep_original_weight=True,
    sequential_edit=False,
)
json.dump(metrics, open(OUT_FILE, "w"), indent=4)
"""


def write(tmp_path, name, text, layer=1, clamp=10):
    path = tmp_path / name
    text = text.replace("LAYER", str(layer)).replace("CLAMP", str(clamp))
    path.write_text(text, encoding="utf-8")
    return path


def mean(values):
    return sum(values) / len(values)


def test_an_easyedit_script_runs_with_only_its_import_changed(tiny_gpt2, tmp_path):
    defaults = default_hparams("rome", tiny_gpt2)  # the layer kedit edits in this model
    write(
        tmp_path, "rome-tiny.yaml", ROME_YAML, defaults["layers"][0], defaults["clamp_norm_factor"]
    )
    script = write(tmp_path, "run_knowedit.py", SCRIPT)
    out = tmp_path / "ROME_results.json"
    scope = runpy.run_path(
        str(script),
        init_globals={
            "DATA_FILE": str(DATA_DIR / "tinyworld_knowedit.json"),
            "HPARAMS_DIR": str(tmp_path / "rome-tiny"),  # EasyEdit scripts omit ".yaml"
            "OUT_FILE": str(out),
        },
    )
    metrics = json.loads(out.read_text())
    assert [case["case_id"] for case in metrics] == [0, 1]
    for case in metrics:
        assert set(case) == {"case_id", "requested_rewrite", "time", "pre", "post"}
        assert case["time"] > 0
        assert set(case["pre"]) == {"rewrite_acc", "rephrase_acc", "portability"}
        assert set(case["post"]) == {"rewrite_acc", "rephrase_acc", "locality", "portability"}
        assert set(case["post"]["portability"]) == {"reasoning_acc"}
        assert len(case["post"]["locality"]["Relation_Specificity_acc"]) == 3
        assert set(case["requested_rewrite"]) >= {"prompt", "target_new", "subject", "locality"}
    post = mean([case["post"]["rewrite_acc"][0] for case in metrics])
    assert post >= mean([case["pre"]["rewrite_acc"][0] for case in metrics])

    # The numbers are EasyEdit's formula (see test_protocols' golden test) applied here by
    # hand on plain forward passes, with EasyEdit's tokenisation of prompt + " " + answer.
    editor = scope["editor"]
    for case, made in zip(metrics, editor.edits, strict=True):
        assert not made.applied  # each edit was undone after it was measured
        asked = case["requested_rewrite"]
        answered = {
            "rewrite_acc": [(asked["prompt"], asked["target_new"])],
            "rephrase_acc": [(asked["rephrase_prompt"], asked["target_new"])],
        }
        reasoning = asked["portability"]["reasoning"]
        portability = [(reasoning["prompt"], reasoning["ground_truth"])]
        near = asked["locality"]["Relation_Specificity"]
        locality = list(zip(near["prompt"], near["ground_truth"], strict=True))
        unedited = [easyedit_argmax(editor.lm, *pair) for pair in locality]
        for stage in ("pre", "post"):
            if stage == "post":
                made.apply()
            for metric, pairs in answered.items():
                assert case[stage][metric] == pytest.approx(easyedit_accuracy(editor.lm, pairs))
            assert case[stage]["portability"]["reasoning_acc"] == pytest.approx(
                easyedit_accuracy(editor.lm, portability)
            )
        kept = [
            sum(a == b for a, b in zip(easyedit_argmax(editor.lm, *pair)[0], before, strict=True))
            / len(before)
            for pair, (before, _) in zip(locality, unedited, strict=True)
        ]
        made.undo()
        assert case["post"]["locality"]["Relation_Specificity_acc"] == pytest.approx(kept)


@torch.no_grad()
def easyedit_argmax(lm, prompt, answer):
    """The argmax tokens at the answer positions of `prompt + " " + answer` (teacher forced,
    one plain forward pass, tokenised together as EasyEdit does) and the answer's tokens."""
    ids = lm.tokenizer(f"{prompt} {answer}")["input_ids"]
    start = len(lm.tokenizer(prompt)["input_ids"])
    logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
    return logits[start - 1 : -1].argmax(-1).tolist(), ids[start:]


def easyedit_accuracy(lm, pairs):
    """EasyEdit's accuracy of each (prompt, answer): the fraction of answer tokens that are the
    argmax given the gold prefix."""
    hits = []
    for prompt, answer in pairs:
        predicted, answer_ids = easyedit_argmax(lm, prompt, answer)
        hits.append(
            sum(p == a for p, a in zip(predicted, answer_ids, strict=True)) / len(answer_ids)
        )
    return hits


class Bigram:
    """Makes a model's logits those of a bigram table written in a test: at every position the
    argmax is `table[token at that position]` (unlisted tokens predict token 0). The table is
    `after` while parameter SWITCH (zero in a fresh GPT-2) is non-zero, else `before`; `edit`
    makes an Edit that adds ones to SWITCH."""

    SWITCH = "transformer.ln_f.bias"

    def __init__(self, lm, before, after):
        self.lm, self.before, self.after = lm, before, after
        assert not lm.model.get_parameter(self.SWITCH).any()
        lm.model.register_forward_hook(self.logits, with_kwargs=True)

    def logits(self, _module, _args, kwargs, output):
        edited = bool(self.lm.model.get_parameter(self.SWITCH).any())
        vocab = output.logits.shape[-1]
        following = torch.zeros(vocab, dtype=torch.long)
        for token, then in (self.after if edited else self.before).items():
            following[token] = then
        output.logits = 10.0 * torch.nn.functional.one_hot(following[kwargs["input_ids"]], vocab)
        return output

    def edit(self, requests):
        from kedit.edits import Edit, WeightDelta

        ones = torch.ones_like(self.lm.model.get_parameter(self.SWITCH))
        delta = WeightDelta.from_dense(self.SWITCH, ones)
        return Edit(self.lm, "ft-m", {}, requests, [delta]).apply()


# Token ids of the conftest BPE tokenizer (checked in the test).
IDS = {
    "Ana Costa works as a": [346, 351, 359, 334, 259],
    "Ana Costa lives in": [346, 351, 292, 260],
    " teacher in Porto": [361, 260, 357],
    "Tomas Berg lives in": [348, 344, 292, 260],
    " Oslo.": [287, 14],
    "The capital of Norway is": [291, 360, 285, 356, 262],
    " Oslo": [287],
    "The mother tongue of Mira Olsen is": [291, 358, 362, 285, 324, 293, 262],
    " Danish": [352],
}
A, TEACHER, IN, PORTO, OSLO, IS, DANISH, OF = 259, 361, 260, 357, 287, 262, 352, 285
# The unedited table continues " a" with " teacher", " teacher" with " of", " in" with " Oslo",
# " Oslo" with " of" and " is" with " Oslo"; the edit makes " teacher" -> " in", " in" ->
# " Porto" and " is" -> " Danish".
BEFORE = {A: TEACHER, TEACHER: OF, IN: OSLO, OSLO: OF, IS: OSLO}
AFTER = {**BEFORE, TEACHER: IN, IN: PORTO, IS: DANISH}
# EasyEdit's values by hand. The argmax at each answer position is the table's entry for the
# token before it (the prompt's last token, then the answer's own tokens):
# rewrite " teacher in Porto" after " a": before [teacher, of, Oslo] -> 1/3; after
#   [teacher, in, Porto] -> 3/3.
# rephrase after " in": before [Oslo, of, Oslo] -> 0/3; after [Porto, in, Porto] -> 2/3.
# locality "Tomas Berg lives in" + " Oslo.": before [Oslo, of], after [Porto, of] -> 1/2 kept
#   (the answer is not compared: its token accuracy after the edit is 0/2);
#   "The capital of Norway is" + " Oslo": before [Oslo], after [Danish] -> 0/1 kept.
# portability "... Mira Olsen is" + " Danish": before [Oslo] -> 0; after [Danish] -> 1.


def test_editor_and_evaluate_report_easyedits_values_on_a_written_bigram_model(
    random_gpt2, monkeypatch
):
    """BaseEditor.edit and kedit.evaluate report EasyEdit's teacher-forced metrics (its
    definitions are in test_protocols' `test_teacher_forced_metrics_on_golden_values`): the
    editor one value per prompt, evaluate their mean per probe set. The model's logits are a
    bigram table written above, the edit switches it, the values are worked out by hand."""
    lm = random_gpt2
    for text, ids in IDS.items():
        assert lm.encode(text) == ids, text
    bigram = Bigram(lm, BEFORE, AFTER)
    monkeypatch.setattr(compat, "kedit_edit", lambda _lm, requests, *_, **__: bigram.edit(requests))
    metrics, _, _ = ft_editor(lm).edit(
        prompts="Ana Costa works as a",
        target_new="teacher in Porto",
        subject="Ana Costa",
        rephrase_prompts="Ana Costa lives in",
        locality_inputs={
            "Relation_Specificity": {
                "prompt": [["Tomas Berg lives in", "The capital of Norway is"]],
                "ground_truth": [["Oslo.", "Oslo"]],
            }
        },
        portability_inputs={
            "reasoning": {"prompt": "The mother tongue of Mira Olsen is", "ground_truth": "Danish"}
        },
        verbose=False,
    )
    (case,) = metrics
    assert case["pre"] == {
        "rewrite_acc": [pytest.approx(1 / 3)],
        "rephrase_acc": [0.0],
        "portability": {"reasoning_acc": [0.0]},
    }
    assert case["post"] == {
        "rewrite_acc": [1.0],
        "rephrase_acc": [pytest.approx(2 / 3)],
        "locality": {"Relation_Specificity_acc": [0.5, 0.0]},
        "portability": {"reasoning_acc": [1.0]},
    }

    request = kedit.EditRequest(
        prompt="{} works as a",
        subject="Ana Costa",
        target_new=" teacher in Porto",
        rephrase=["{} lives in"],
        locality=[("Tomas Berg lives in", " Oslo."), ("The capital of Norway is", " Oslo")],
        portability=[("The mother tongue of Mira Olsen is", " Danish")],
    )
    result = kedit.evaluate(lm, request, edit=bigram.edit([request]), contexts=0)
    assert result["pre"]["teacher_forced"] == {
        "reliability": pytest.approx(1 / 3),
        "generalization": 0.0,
        "portability": 0.0,
    }
    assert result["post"]["teacher_forced"] == {
        "reliability": 1.0,
        "generalization": pytest.approx(2 / 3),
        "locality": 0.25,
        "portability": 1.0,
    }


def test_hyperparameter_files_map_onto_kedit(tmp_path):
    rome = ROMEHyperParams.from_hparams(write(tmp_path, "rome.yaml", ROME_YAML))
    assert rome.method == "rome"
    assert rome.v_lr == 0.5  # YAML reads "5e-1" as a string; EasyEdit makes it a float
    assert rome.layers == [1]
    # EasyEdit's v_weight_decay weighs its own decay term; kedit's default is another
    assert rome.kedit_values()["v_weight_decay_form"] == "easyedit"
    assert get_method("rome").hparams().v_weight_decay_form == "squared"
    rome.v_weight_decay_form = "squared"
    assert rome.kedit_values()["v_weight_decay_form"] == "squared"

    memit = MEMITHyperParams.from_hparams(write(tmp_path, "memit.yaml", MEMIT_YAML))
    assert (memit.method, memit.batch_size) == ("memit", 4)

    ft = FTHyperParams.from_hparams(write(tmp_path, "ft.yaml", FT_YAML))
    assert ft.method == "ft-m"
    assert ft.kedit_values()["norm_constraint"] is None
    ft.objective_optimization = "prompt_last"
    assert ft.method == "ft-l"

    assert compat.R_ROMEHyperParams(**{**rome.config, "alg_name": "R-ROME"}).method == "r-rome"
    ft_m = compat.FT_MHyperParams(**{**ft.config, "alg_name": "FT-M"})  # found by method name
    assert ft_m.method == "ft-m"
    with pytest.raises(AttributeError):
        compat.NoSuchMethodHyperParams  # noqa: B018


def test_batch_method_files_of_easyedit_map_onto_kedit(tmp_path):
    """EasyEdit's AlphaEdit and PMET files are MEMIT's keys plus their own."""
    base = MEMIT_YAML.replace("batch_size: 4", "batch_size: 2")
    extra = {
        "AlphaEdit": "nullspace_threshold: 2e-2\nL2: 10\n",
        "PMET": "",
    }
    for alg_name, keys in extra.items():
        text = base.replace('alg_name: "MEMIT"', f'alg_name: "{alg_name}"') + keys
        path = write(tmp_path, f"{alg_name}.yaml", text)
        params = getattr(compat, f"{alg_name}HyperParams").from_hparams(path)
        assert params.method == alg_name.lower()
        resolved = get_method(params.method).hparams.from_dict(params.kedit_values())
        assert (resolved.v_steps, resolved.layers) == (20, [1, 2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v_sample": 3}, r"unknown hyper-parameter 'v_sample'"),
        ({"alg_name": "MEMIT"}, r"alg_name: ROMEHyperParams reads files of rome, got 'MEMIT'"),
        ({"layers": [1, 2]}, r"layers: ROME edits exactly one layer"),
        ({"fact_token": "subject_first"}, r"fact_token: expected one of subject_last, last"),
        ({"v_lr": "fast"}, r"rome.v_lr: expected float, got 'fast'"),
        ({"model_name": None}, r"model_name: expected a bundled model name"),
    ],
)
def test_bad_hyperparameter_files_name_the_key(tmp_path, change, message):
    config = {**ROMEHyperParams.from_hparams(write(tmp_path, "r.yaml", ROME_YAML)).config}
    config.update(change)
    with pytest.raises(ValueError, match=message):
        ROMEHyperParams(**config)
    with pytest.raises(FileNotFoundError, match="nothing.yaml"):
        ROMEHyperParams.from_hparams(tmp_path / "nothing")


def ft_editor(lm, **changes):
    config = {
        "alg_name": "FT",
        "model_name": lm,
        "layers": [1],
        "num_steps": 10,
        "lr": 1e-2,
        "weight_decay": 0,
        "kl_factor": 0,
        "norm_constraint": False,
        "objective_optimization": "target_new",
        "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
        "batch_size": 2,
        **changes,
    }
    return BaseEditor.from_hparams(FTHyperParams(**config))


def test_independent_edits_are_undone_and_sequential_ones_kept(random_gpt2):
    editor = ft_editor(random_gpt2)
    name = "transformer.h.1.mlp.c_proj.weight"
    original = random_gpt2.model.get_parameter(name).detach().clone()
    prompts, targets = ["Mira Olsen lives in", "Tomas Berg lives in"], ["Oslo", "Porto"]

    metrics, model, weights_copy = editor.edit(prompts=prompts, target_new=targets, verbose=False)
    assert model is random_gpt2.model
    assert torch.equal(model.get_parameter(name), original)
    assert torch.equal(weights_copy[name], original)
    assert [e.applied for e in editor.edits] == [False, False]
    assert metrics[1]["requested_rewrite"] == {
        "prompt": "Tomas Berg lives in",
        "target_new": "Porto",
        "ground_truth": "<|endoftext|>",
        "portability": {},
        "locality": {},
    }

    metrics, model, weights_copy = editor.edit(
        prompts=prompts, target_new=targets, sequential_edit=True, test_generation=True
    )
    assert not torch.equal(model.get_parameter(name), original)
    assert torch.equal(weights_copy[name], original)
    assert [e.applied for e in editor.edits] == [True]
    assert set(metrics[0]["post"]["fluency"]) == {"ngram_entropy"}
    editor.edits[0].undo()
    assert torch.equal(model.get_parameter(name), original)

    metrics, _, _ = editor.batch_edit(prompts=prompts * 2, target_new=targets * 2)
    assert len(metrics) == 4 and len(editor.edits) == 2  # batch_size 2
    assert torch.equal(model.get_parameter(name), original)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_new": ["Oslo"]}, r"target_new: expected 2 entries"),
        ({"rephrase_prompts": ["only one"]}, r"rephrase_prompts: expected 2 entries"),
        ({"subject": ["Mira Olsen", "Nobody"]}, r"edit 1 .*neither '\{\}' nor the subject"),
        (
            {"locality_inputs": {"nb": {"prompt": ["a", "b"], "ground_truth": ["x"]}}},
            r"locality_inputs\['nb'\]\['ground_truth'\]: expected 2 entries",
        ),
        (
            {
                "portability_inputs": {
                    "hop": {"prompt": [["a", "b"], None], "ground_truth": ["x", None]}
                }
            },
            r"portability_inputs\['hop'\]\['ground_truth'\]\[0\]: expected 2 answers",
        ),
        ({"locality_prompts": ["a", "b"]}, r"locality_prompts: not an argument of edit"),
        ({"eval_metric": "ppl"}, r"eval_metric: only token accuracy"),
    ],
)
def test_edit_inputs_are_checked(random_gpt2, kwargs, message):
    editor = ft_editor(random_gpt2)
    call = {
        "prompts": ["Mira Olsen lives in", "Tomas Berg lives in"],
        "target_new": ["Oslo", "Porto"],
        "subject": ["Mira Olsen", "Tomas Berg"],
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        editor.edit(**call)


def test_editor_checks_the_file_against_the_model(random_gpt2, tmp_path):
    with pytest.raises(ValueError, match=r"rewrite_module_tmp: .*'transformer.h.1.mlp.c_fc'"):
        ft_editor(random_gpt2, rewrite_module_tmp="transformer.h.{}.mlp.c_fc")
    with pytest.raises(ValueError, match=r"layers: layer 7 is out of range"):
        ft_editor(random_gpt2, layers=[7])
    with pytest.raises(ValueError, match="batch_edit: method 'ROME' edits one fact at a time"):
        config = {**ROMEHyperParams.from_hparams(write(tmp_path, "r.yaml", ROME_YAML)).config}
        editor = BaseEditor(ROMEHyperParams(**{**config, "model_name": random_gpt2, "layers": [0]}))
        editor.batch_edit(prompts=["Mira Olsen lives in"], target_new=["Oslo"])
    editor = BaseEditor(ROMEHyperParams(**{**config, "model_name": random_gpt2, "layers": [0]}))
    with pytest.raises(ValueError, match="subject: ROME edits at the subject's last token"):
        editor.edit(prompts=["Mira Olsen lives in"], target_new=["Oslo"])
    with pytest.raises(TypeError, match="hparams: expected an EasyEdit hyper-parameter object"):
        BaseEditor({"alg_name": "ROME"})
