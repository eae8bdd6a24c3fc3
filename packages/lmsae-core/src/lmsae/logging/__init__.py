"""Metric loggers (console, JSON lines, Weights & Biases) and their registration records.

See :mod:`lmsae.logging.loggers`. :data:`LOGGER_SPECS` lists the built-in loggers for the core
plugin to register.
"""

from __future__ import annotations

from lmsae.logging.loggers import (
    DEFAULT_CONSOLE_KEYS,
    LOGGER_SPECS,
    SUMMARY_FILE,
    WANDB_RUN_ID_FILE,
    ConsoleLogger,
    ConsoleLoggerConfig,
    JsonlLogger,
    JsonlLoggerConfig,
    LoggerContext,
    MetricLogger,
    MultiLogger,
    NullLogger,
    WandbLogger,
    WandbLoggerConfig,
    format_console_value,
    make_console_logger,
    make_jsonl_logger,
    make_wandb_logger,
    read_jsonl_metrics,
)

__all__ = [
    "DEFAULT_CONSOLE_KEYS",
    "LOGGER_SPECS",
    "SUMMARY_FILE",
    "WANDB_RUN_ID_FILE",
    "ConsoleLogger",
    "ConsoleLoggerConfig",
    "JsonlLogger",
    "JsonlLoggerConfig",
    "LoggerContext",
    "MetricLogger",
    "MultiLogger",
    "NullLogger",
    "WandbLogger",
    "WandbLoggerConfig",
    "format_console_value",
    "make_console_logger",
    "make_jsonl_logger",
    "make_wandb_logger",
    "read_jsonl_metrics",
]
