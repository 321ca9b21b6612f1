"""Knowledge mechanisms on the native model: causal tracing, the logit lens, knowledge-neuron
attribution, the edit layer they locate, and knowledge circuits (edge attribution patching)."""
