"""Reports about a dictionary's features, from what a store recorded.

- ``lmsae show feature NAME INDEX``: one feature in the terminal (:func:`render_feature`).
- ``lmsae report NAME --out DIR``: a static HTML site, openable from disk (:func:`write_report`).

Both rebuild text from stored token ids with the dictionary's language-model tokenizer
(:func:`tokenizer_for`) and highlight each token by the feature's activation on it. The commands
are added by :func:`lmsae.report.commands.register`.
"""

from lmsae.report.html import ReportResult, write_report
from lmsae.report.terminal import render_feature
from lmsae.report.text import FeatureView, TokenDecoder, load_feature_view, tokenizer_for

__all__ = ["FeatureView", "ReportResult", "TokenDecoder", "load_feature_view", "render_feature",
           "tokenizer_for", "write_report"]
