"""lmsae-clt: the cross-layer transcoder (CLT) architecture for lmsae.

- :class:`~lmsae_clt.config.CLTConfig` / :class:`~lmsae_clt.model.CrossLayerTranscoder`
  (``[dictionary] architecture = "clt"``);
- layer-wise TopK activations (:mod:`lmsae_clt.activations`);
- TopK -> JumpReLU conversion with per-layer thresholds (:mod:`lmsae_clt.convert`);
- export to / import from circuit-tracer's CLT layout (:mod:`lmsae_clt.circuit_tracer`);
- CLI: ``lmsae clt to-jumprelu | export-circuit-tracer | import-circuit-tracer``.
"""

from lmsae_clt.config import CLTConfig
from lmsae_clt.model import CLT_SPEC, CrossLayerTranscoder

__all__ = ["CLT_SPEC", "CLTConfig", "CrossLayerTranscoder"]
__version__ = "0.1.0"
