"""The deployment config (``serve --config deploy.yaml``): the seed's shape, checked, turned into ``SLMOPS_*``.

```yaml
deployment:                       # optional wrapper, as in the seed
  model: smollm2:135m
  hardware: {preferred: npu, fallback: [gpu, cpu]}
  optimization: {quantization: auto, batch_size: 512, max_context: 4096}
  api: {host: 127.0.0.1, port: 11434, openai_compatible: true}
  performance: {parallel_requests: 4, kv_cache_type: f16, kv_cache_budget: 1GiB, keep_alive: 10m}
  privacy: {feedback: false}      # true: collect rated feedback (prompt and answer text); off by default
```

The file only supplies values for settings that exist anyway, so one precedence rule covers everything
(environment > config > default) and ``slmops env`` can say where each value came from. Every mistake is one line
naming the file and the dotted field and saying what the field accepts: unknown keys (with the closest known one),
wrong types, bad ranges, keys given twice. Types are strict: ``batch_size: true`` or ``keep_alive: yes`` would
otherwise be read as 1 and silently mean something else.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from slmops.config.settings import parse_duration, parse_size
from slmops.types.errors import ConfigError, InvalidName
from slmops.types.name import ModelName

Accelerator = Literal["npu", "gpu", "cpu"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Hardware(_Section):
    preferred: Accelerator | None = Field(None, description="one of npu, gpu, cpu")
    fallback: list[Accelerator] = Field(default_factory=list, description="a list of npu, gpu, cpu")


class Optimization(_Section):
    quantization: str | None = Field(None, description="auto, dynamic or a quantization type such as q4_k_m or q8_0")
    batch_size: int | None = Field(None, ge=1, description="a positive integer (prompt tokens per decode step)")
    max_context: int | None = Field(None, ge=16, description="an integer of at least 16 (tokens)")

    @field_validator("quantization")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from slmops.types.quant import FTYPES
        if v is not None and v.lower() not in ("auto", "dynamic", *FTYPES):
            raise ValueError("unknown quantization type")
        return v.lower() if v is not None else None


class Api(_Section):
    host: str | None = Field(None, description="a host name or IP address, without a port (that goes in api.port)")
    port: int | None = Field(None, ge=1, le=65535, description="an integer from 1 to 65535")
    openai_compatible: bool | None = Field(None, description="true or false")

    @field_validator("host")
    @classmethod
    def _bare_host(cls, v: str | None) -> str | None:
        """A port here would end up inside SLMOPS_HOST twice and fail only when serve binds."""
        if v is None:
            return None
        v = v.strip().removeprefix("[").removesuffix("]")
        if not v or any(c.isspace() or c in "/[]" for c in v) or v.count(":") == 1:
            raise ValueError("not a bare host")
        return v


class Performance(_Section):
    parallel_requests: int | None = Field(None, ge=1, le=64, description="an integer from 1 to 64")
    kv_cache_type: Literal["f16", "q8_0"] | None = Field(None, description="f16 or q8_0")
    kv_cache_budget: Any = Field(None, description="a size in bytes or with a unit, such as 512MiB or 1GiB")
    keep_alive: Any = Field(None, description="a duration such as 10m or 1h30m, or seconds (negative: forever)")

    @field_validator("kv_cache_budget", "keep_alive")
    @classmethod
    def _parsed(cls, v: Any, info: ValidationInfo) -> Any:
        """Checked by the parser the setting itself uses, so the file accepts exactly what the variable does."""
        if v is not None:
            (parse_size if info.field_name == "kv_cache_budget" else parse_duration)(_scalar(v))
        return v


class Privacy(_Section):
    # true: keep rated feedback with its prompt and answer text (/api/feedback) and, on a fleet device, send it to
    # the control plane; the only way any text leaves a device
    feedback: bool | None = Field(None, description="true or false")


def _scalar(v: Any) -> str:
    """Text for a number or string field; booleans are refused, since YAML reads ``yes`` as one."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError("not a number or string")  # noqa: TRY004 - pydantic reports only ValueError
    return str(v)


class DeployConfig(_Section):
    model: str | None = Field(None, description="a model name such as smollm2:135m")
    hardware: Hardware = Field(default_factory=Hardware)
    optimization: Optimization = Field(default_factory=Optimization)
    api: Api = Field(default_factory=Api)
    performance: Performance = Field(default_factory=Performance)
    privacy: Privacy = Field(default_factory=Privacy)

    @field_validator("model")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ModelName.parse(v)
            except InvalidName:
                raise ValueError("invalid model name") from None
        return v


def load_deploy(path: Path) -> DeployConfig:
    """The file at ``path``, checked; any problem is a one-line :class:`ConfigError` naming the file."""
    name = path.name
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read the deployment config ({getattr(err, 'strerror', None) or err}); "
                          "fix the path given to --config or SLMOPS_CONFIG") from None
    data = _parse(name, text, json_only=path.suffix.lower() == ".json")
    prefix = ""
    if isinstance(data, dict) and set(data) == {"deployment"}:
        data, prefix = data["deployment"], "deployment."
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of sections (model, hardware, optimization, "
                          "api, performance, privacy)")
    try:
        return DeployConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{name}: {_describe(err, prefix)}") from None


def check_deploy(data: Any, where: str) -> DeployConfig:
    """A config that arrived already parsed (a fleet blueprint layer), checked as strictly as a file; any problem
    is the one-line :class:`ConfigError` a file gets, with ``where`` in place of the file name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (model, hardware, optimization, "
                          "api, performance, privacy)")
    try:
        return DeployConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {_describe(err, '')}") from None


class _Twice(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` keeps the last of two equal keys; a config that says a thing twice is a mistake."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise _Twice(problem=f"key {key} appears twice; keep one",
                                           problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"key {twice} appears twice; keep one")
    return dict(pairs)


def _parse(name: str, text: str, json_only: bool) -> Any:
    if json_only:
        try:
            return json.loads(text, object_pairs_hook=_unique_json_keys)
        except ValueError as err:
            raise ConfigError(f"{name}: invalid JSON ({err})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "syntax error"
        if isinstance(err, _Twice):
            raise ConfigError(f"{name}: {line}: {problem}") from None
        raise ConfigError(f"{name}: invalid YAML{' at ' + line if line else ''}: {problem}") from None


def _describe(err: ValidationError, prefix: str) -> str:
    """The first mistake as one line (``and N more`` for the rest): fixing files one error at a time is slow, but
    a wall of pydantic output is slower to read."""
    errors = err.errors()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _one(errors[0], prefix) + more


def _one(e: Any, prefix: str) -> str:
    loc = list(e["loc"])
    field = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    parent, spec = _walk([p for p in loc if not isinstance(p, int)])
    if e["type"] == "extra_forbidden":
        known = list(parent.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        where = field.rpartition(".")[0]
        hint = f"did you mean {where + '.' if where else ''}{close[0]}?" if close else f"known keys: {', '.join(known)}"
        return f"unknown key {field}; {hint}"
    return f"{field}: must be {spec or e['msg']}; got {_shown(e.get('input'))}"


def _walk(parts: list[Any]) -> tuple[type[BaseModel], str | None]:
    """The model holding the last key of ``parts``, and what that key accepts."""
    model: type[BaseModel] = DeployConfig
    spec = None
    for i, part in enumerate(parts):
        info = model.model_fields.get(str(part))
        if info is None:
            return model, None
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            spec = f"a mapping with keys {', '.join(sub.model_fields)}"
            if i < len(parts) - 1:
                model = sub
        else:
            spec = info.description
    return model, spec


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def to_settings(cfg: DeployConfig) -> dict[str, str]:
    """The ``SLMOPS_*`` values the file sets; what it leaves out keeps its default (or placement's choice)."""
    out: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        if value is not None and value != []:
            out[name] = ",".join(value) if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) else str(value)

    put("SLMOPS_MODEL", cfg.model)
    put("SLMOPS_HARDWARE_PREFERRED", cfg.hardware.preferred)
    put("SLMOPS_HARDWARE_FALLBACK", cfg.hardware.fallback)
    put("SLMOPS_QUANTIZATION", cfg.optimization.quantization)
    put("SLMOPS_NUM_BATCH", cfg.optimization.batch_size)
    put("SLMOPS_CONTEXT_LENGTH", cfg.optimization.max_context)
    if cfg.api.host is not None or cfg.api.port is not None:
        host = cfg.api.host or "127.0.0.1"
        out["SLMOPS_HOST"] = f"[{host}]:{cfg.api.port or 11434}" if ":" in host else f"{host}:{cfg.api.port or 11434}"
    put("SLMOPS_OPENAI_COMPATIBLE", cfg.api.openai_compatible)
    put("SLMOPS_NUM_PARALLEL", cfg.performance.parallel_requests)
    put("SLMOPS_KV_CACHE_TYPE", cfg.performance.kv_cache_type)
    put("SLMOPS_KV_BUDGET", cfg.performance.kv_cache_budget)
    put("SLMOPS_KEEP_ALIVE", cfg.performance.keep_alive)
    put("SLMOPS_FEEDBACK", cfg.privacy.feedback)
    return out
