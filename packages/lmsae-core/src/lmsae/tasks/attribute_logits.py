"""``task = "attribute-logits"``: direct logit attribution of every feature of a saved dictionary.

Each feature's decoder direction is pushed through the language model's final normalisation and
unembedding (:func:`lmsae.analysis.direct_logit_attribution`); the tokens it promotes and
suppresses most are recorded in the store under the dictionary's ``(name, series)``.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, ClassVar

from lmsae.analysis.logits import direct_logit_attribution
from lmsae.config import LanguageModelConfig, RunConfig, StoreConfig, config_class, option
from lmsae.config.fields import non_empty, positive
from lmsae.dictionary.io import PretrainedConfig
from lmsae.errors import LmsaeError
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext
from lmsae.stores.base import LogitAttribution
from lmsae.stores.configs import open_store
from lmsae.tasks.analyze import dictionary_name, record_dictionary
from lmsae.tasks.common import model_loader, resolve_device


@config_class
class AttributeLogitsRunConfig(RunConfig):
    """Record the output tokens each feature's decoder direction promotes and suppresses."""

    name: ClassVar[str] = "attribute-logits"

    pretrained: PretrainedConfig = option(doc="The dictionary ([pretrained] table).")
    dictionary_name: str | None = option(
        None, doc="Name of the dictionary in the store (default: the name of the pretrained directory).",
        validator=non_empty())
    series: str = option("default", doc="Series (group of dictionaries) the dictionary is stored under.",
                         validator=non_empty())
    model: LanguageModelConfig = option(
        doc="The language model whose final norm and unembedding are used ([model] table; backend "
            "transformer_lens).")
    top_k: int = option(10, doc="Tokens recorded per feature in each direction (promoted, suppressed).",
                        validator=positive())
    batch_features: int = option(512, doc="Features attributed at once (bounds memory: batch x vocabulary "
                                          "logits).", validator=positive())
    include_bias: bool = option(
        False, doc="Keep the final norm's and the unembedding's biases in the logits (the same for every "
                   "feature; off: logits(d) = unembed(ln_final(d)) - unembed(ln_final(0))).")
    store: StoreConfig | None = option(None, doc="Where results are recorded ([store] table; default: the local "
                                                 "store).")
    device: str = option("auto", doc="Device the dictionary is loaded on: 'auto' (CUDA if available), 'cpu', ...")


def run(cfg: AttributeLogitsRunConfig, context: RunContext) -> list[LogitAttribution]:
    registry = context.registry
    model = cfg.pretrained.load(registry, device=resolve_device(cfg.device))
    name = dictionary_name(cfg.pretrained, cfg.dictionary_name)
    lm = model_loader(registry, cfg.model)()
    start = time.monotonic()
    attributions = direct_logit_attribution(model, lm, top_k=cfg.top_k, batch=cfg.batch_features,
                                            include_bias=cfg.include_bias)
    seconds = time.monotonic() - start
    with open_store(registry, cfg.store) as store:
        record_dictionary(store, registry, cfg.pretrained, name, cfg.series, lm.name)
        store.put_logit_attributions(name, cfg.series, attributions)
    _print_summary(context, name, cfg.series, lm.name, attributions, seconds)
    return attributions


def _print_summary(context: RunContext, name: str, series: str, model_name: str,
                   attributions: list[LogitAttribution], seconds: float, shown: int = 5, tokens: int = 5) -> None:
    context.echo("")
    context.echo(f"attributed {len(attributions):,} features of {name!r} (series {series!r}) to the logits of "
                 f"{model_name} in {seconds:.1f}s")
    for a in attributions[:shown]:
        plus = ", ".join(f"{t.token!r} {t.logit:+.2f}" for t in a.top_positive[:tokens])
        minus = ", ".join(f"{t.token!r} {t.logit:+.2f}" for t in a.top_negative[:tokens])
        context.echo(f"  #{a.index:<6} promotes {plus}")
        context.echo(f"  {'':7} suppresses {minus}")


def example(registry: Any, architecture: str | None = None) -> AttributeLogitsRunConfig:
    """Direct logit attribution of the quickstart dictionary (runs/quickstart) through SmolLM2."""
    from lmsae.models.transformer_lens import TransformerLensConfig

    if architecture is not None:
        raise LmsaeError("the attribute-logits task reads the architecture from the saved dictionary; "
                         "it takes no architecture")
    return AttributeLogitsRunConfig(pretrained=PretrainedConfig(path=pathlib.Path("runs/quickstart")),
                                    model=TransformerLensConfig(model="smollm2-135m"))


SPEC = TaskSpec(config_class=AttributeLogitsRunConfig, factory=run, example=example,
                summary="record the tokens each feature's decoder direction promotes and suppresses")
