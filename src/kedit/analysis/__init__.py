"""Knowledge mechanisms on the native model: causal tracing, the logit lens, knowledge-neuron
attribution, the edit layer they locate, knowledge circuits (edge attribution patching), and
how an edit changes them. Every analysis returns a plain object with `to_json()`, `plot()`
and `save(folder)`.

    import kedit
    from kedit import analysis
    lm = kedit.load("tiny-gpt2")
    fact = {"prompt": "{} lives in", "subject": "Wim Gardale", "answer": " Stavanger"}
    analysis.trace(lm, fact).save("trace/")
    analysis.lens(lm, "{} lives in", " Stavanger", subject="Wim Gardale").plot("lens.png")
"""

from kedit.analysis._common import known_facts, tinyworld_facts
from kedit.analysis.circuit import Circuit, attribute, circuit, contrast_pairs, evaluate_edges
from kedit.analysis.compare import (
    CircuitDiff,
    EditMechanisms,
    compare_circuits,
    edit_circuits,
    edit_mechanisms,
)
from kedit.analysis.evolution import Evolution, evolution
from kedit.analysis.graph import CircuitGraph, build_graph
from kedit.analysis.lens import LensResult, TunedLens, lens, train_tuned_lens
from kedit.analysis.locate import Located, auto_layers, locate, world_facts
from kedit.analysis.neurons import NeuronAttribution, neuron_attributions, neurons
from kedit.analysis.trace import AverageTrace, CausalTrace, trace, trace_facts
from kedit.data.facts import Fact, load_facts

__all__ = [
    "AverageTrace",
    "CausalTrace",
    "Circuit",
    "CircuitDiff",
    "CircuitGraph",
    "EditMechanisms",
    "Evolution",
    "Fact",
    "LensResult",
    "Located",
    "NeuronAttribution",
    "TunedLens",
    "attribute",
    "auto_layers",
    "build_graph",
    "circuit",
    "compare_circuits",
    "contrast_pairs",
    "edit_circuits",
    "edit_mechanisms",
    "evaluate_edges",
    "evolution",
    "known_facts",
    "lens",
    "load_facts",
    "locate",
    "neuron_attributions",
    "neurons",
    "tinyworld_facts",
    "trace",
    "trace_facts",
    "train_tuned_lens",
    "world_facts",
]
