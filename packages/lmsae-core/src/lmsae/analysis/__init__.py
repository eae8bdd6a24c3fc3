"""Feature analysis: per-feature statistics and example contexts (:mod:`.features`) and direct
logit attribution of decoder directions (:mod:`.logits`)."""

from lmsae.analysis.features import FeatureAnalyzer, analyze_stream, attach_extras
from lmsae.analysis.logits import direct_logit_attribution, direction_logits

__all__ = ["FeatureAnalyzer", "analyze_stream", "attach_extras", "direct_logit_attribution", "direction_logits"]
