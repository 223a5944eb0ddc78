"""Runtime settings: one pydantic-settings class, env prefix ``CRYSTALOOP_``.

Sources, highest priority first: keyword arguments, environment variables
(``CRYSTALOOP_MONGODB_URI`` ...), the YAML file named by
``CRYSTALOOP_SETTINGS_FILE`` (default ``<data_dir>/settings.yaml`` if it
exists), then defaults.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from crystaloop.errors import ConfigError, read_yaml

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^@/]*@)")


def redact_uri(uri: str | None) -> str:
    """Return ``uri`` with any ``user:password@`` part replaced by ``***@``."""
    if not uri:
        return "<embedded>"
    return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", uri)


def default_data_dir() -> Path:
    """``./.crystaloop`` when it exists in the working directory, else ``~/.crystaloop``."""
    local = Path.cwd() / ".crystaloop"
    return local if local.is_dir() else Path.home() / ".crystaloop"


class _YamlSource(PydanticBaseSettingsSource):
    """Settings from an optional YAML file."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("CRYSTALOOP_SETTINGS_FILE")
        data_dir = Path(os.environ.get("CRYSTALOOP_DATA_DIR") or default_data_dir()).expanduser()
        candidate = Path(path) if path else data_dir / "settings.yaml"
        self._data: dict[str, Any] = {}
        if candidate.is_file():
            loaded = read_yaml(candidate, what="settings file") or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"settings file {candidate} must hold a mapping of key: value")
            self._data = loaded
        elif path:
            raise ConfigError(
                f"CRYSTALOOP_SETTINGS_FILE={path} does not exist; point it at a YAML file or unset it"
            )

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class CrystaloopSettings(BaseSettings):
    """Where crystaloop keeps its state and how it runs external programs."""

    model_config = SettingsConfigDict(env_prefix="CRYSTALOOP_", extra="ignore")

    mongodb_uri: str | None = Field(
        None,
        description="mongodb:// or mongodb+srv:// URI. Unset: start the embedded server.",
        repr=False,
    )
    database: str = Field("crystaloop", description="Database name.")
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="State directory (embedded DB, checkpoints, job folders).",
    )
    pw_command: str = Field("pw.x", description="Command that runs pw.x, e.g. 'mpirun -np 4 pw.x'.")
    pseudo_dir: Path | None = Field(
        None, description="Pseudopotential directory; default <data_dir>/pseudo/local-pbe."
    )
    pseudo_family: Path | None = Field(
        None, description="Pseudopotential family YAML; default <pseudo_dir>/family.yaml."
    )
    omp_num_threads: int = Field(1, ge=1, description="OMP_NUM_THREADS for pw.x.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device.")

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("database")
    @classmethod
    def _database_name(cls, value: str) -> str:
        bad = sorted({c for c in value if c in '/\\. "$' or ord(c) < 32})
        if not value or bad:
            shown = " ".join(repr(c) for c in bad) or "an empty name"
            raise ValueError(f"a MongoDB database name cannot hold {shown}; use letters, digits, _ or -")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls,
        init_settings,
        env_settings,
        dotenv_settings,
        file_secret_settings,
    ):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def uses_embedded_db(self) -> bool:
        """True when no URI is configured."""
        return not self.mongodb_uri

    @property
    def safe_uri(self) -> str:
        """The URI with credentials removed, for logs and messages."""
        return redact_uri(self.mongodb_uri)

    def resolved_pseudo_dir(self) -> Path:
        """The pseudopotential directory in use."""
        return (self.pseudo_dir or self.data_dir / "pseudo" / "local-pbe").expanduser()

    def resolved_pseudo_family(self) -> Path:
        """The family YAML in use."""
        return (self.pseudo_family or self.resolved_pseudo_dir() / "family.yaml").expanduser()

    def resolve_device(self) -> str:
        """``cuda`` when asked for or available under ``auto``, else ``cpu``."""
        from crystaloop.generative.device import resolve_device

        return resolve_device(self.device)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in type(self).model_fields if k != "mongodb_uri")
        return f"CrystaloopSettings(mongodb_uri={self.safe_uri!r}, {fields})"

    __str__ = __repr__


@lru_cache(maxsize=1)
def get_settings() -> CrystaloopSettings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` after env changes).

    Raises
    ------
    ConfigError
        A setting (from the environment or the settings file) has a value it cannot take.
    """
    from pydantic import ValidationError

    try:
        return CrystaloopSettings()
    except ValidationError as exc:
        lines = [
            f"setting {'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']} "
            f"(got {err.get('input')!r}); fix "
            + (f"CRYSTALOOP_{str(err['loc'][0]).upper()}" if err["loc"] else "the environment")
            + " or the settings file"
            for err in exc.errors()
        ]
        raise ConfigError(lines[0] if len(lines) == 1 else "; ".join(lines)) from None
