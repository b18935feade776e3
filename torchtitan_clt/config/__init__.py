from torchtitan_clt.config.job_config import JobConfig
from torchtitan_clt.config.manager import ConfigError, InputError, help_text, load_config, to_toml, validate

__all__ = ["JobConfig", "ConfigError", "InputError", "help_text", "load_config", "to_toml", "validate"]
