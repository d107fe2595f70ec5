"""The BERT family (bert, roberta, xlm-roberta): encoders with post-norm blocks, so no isolatable branches."""

from __future__ import annotations

from .base import Adapter

BERT = Adapter(
    "bert",
    ("bert", "roberta", "xlm-roberta"),
    "encoder.layer",
    (
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
    decoder=False,
)
