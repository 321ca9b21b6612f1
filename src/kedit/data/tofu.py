"""TOFU (Maini et al., 2024): question-answer pairs about fictitious authors, to forget or keep.

The files (`forget01.json`, `retain99.json`, `forget01_perturbed.json`, `world_facts_perturbed
.json`, ... on the hub `locuslab/TOFU`) hold one JSON object per line, named `.json`; copies
as a JSON array occur too. Each row has `question` and `answer`; the `_perturbed` files add
`paraphrased_answer` (a rewording of the answer), `perturbed_answer` (wrong answers, worded
like the paraphrase) and `paraphrased_question`, which TOFU's truth ratio compares. The prompt
is the question as written (TOFU's chat tags are the model's business) and the answer gets a
leading space.
"""

from __future__ import annotations

from functools import partial

from kedit.data._common import records_reader
from kedit.data.unlearn_items import record_item

FORGET_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}

tofu_items = records_reader(
    "tofu",
    partial(record_item, "question"),
    "Unlearning items of a TOFU file (one `question`/`answer` row per item).",
)
