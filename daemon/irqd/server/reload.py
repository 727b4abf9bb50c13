"""SIGHUP: read the config file again and apply what can change while running.

What changes is decided by :func:`irqd.settings.reload_plan`, the same
"flag beats file beats default" rule ``serve`` starts with; this module reads
the file, applies the log level and logs the outcome.
"""

from __future__ import annotations

import structlog

from irqd.config import ServerConfig
from irqd.configfile import ConfigFileError, load_settings
from irqd.logsetup import set_log_level
from irqd.settings import reload_plan

log = structlog.get_logger("irqd.server.reload")


def reload_config(config: ServerConfig) -> ServerConfig:
    """The config to run with after re-reading ``config.config_path``.

    ``config`` itself when there is no file or it cannot be used (logged);
    the access layer takes policy and limits from the returned config afresh.
    """
    path = config.config_path
    if path is None:
        log.info("config.reload", changed=[], note="no config file: nothing to reload")
        return config
    try:
        settings = load_settings(path)
    except ConfigFileError as exc:
        log.error("config.reload_failed", error=str(exc), note="the running settings stay")
        return config
    plan = reload_plan(config, settings)
    if plan.config.log_level != config.log_level:
        set_log_level(plan.config.log_level)
    log.info("config.reloaded", path=str(path), **plan.log_fields())
    return plan.config
