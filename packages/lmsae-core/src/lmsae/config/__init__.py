"""Typed configuration: attrs classes, strict structuring with located errors, config files."""

from lmsae.config.base import (
    Config,
    DictionaryConfig,
    LanguageModelConfig,
    LoggerConfig,
    RunConfig,
    SourceConfig,
    StoreConfig,
    TrainerConfig,
    WriterConfig,
)
from lmsae.config.fields import FieldValueError, config_class, field_doc, option

__all__ = [
    "Config",
    "DictionaryConfig",
    "FieldValueError",
    "LanguageModelConfig",
    "LoggerConfig",
    "RunConfig",
    "SourceConfig",
    "StoreConfig",
    "TrainerConfig",
    "WriterConfig",
    "config_class",
    "field_doc",
    "option",
]
