"""One small fsspec factory for every file the project reads or writes: local paths and URLs.

`open_fs(url, **storage_options) -> (fs, path)` resolves a local path (`/data/coop`,
`relative/dir`, `file:///...`) or a URL (`s3://bucket/coop`, `gs://...`, `memory://...`) to an
fsspec filesystem and the path inside it. Options are merged, later ones winning:

1. fsspec's own environment convention, read at call time (not only at import):
   `FSSPEC_<PROTOCOL>` (a JSON object) and `FSSPEC_<PROTOCOL>_<OPTION>`, e.g.
   `FSSPEC_S3_ENDPOINT_URL=http://minio:9000`;
2. for S3 only: the endpoint from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` when neither of the
   above gives one, and the standard `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
   `AWS_SESSION_TOKEN` (botocore would read them too; passing them makes a change of credentials
   give a new filesystem instead of a cached one). Region and profile are left to botocore
   (`AWS_DEFAULT_REGION`, `AWS_PROFILE`);
3. the explicit `storage_options` of the call.

Secrets are never logged: every message goes through `describe` / `redact`, which mask
credential-looking options.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, IO

import fsspec
from fsspec.config import set_conf_env
from fsspec.core import split_protocol

# option names whose values must never appear in a message (matched as substrings, lower case)
_SECRET_WORDS = ("secret", "password", "token", "key", "credential", "auth", "signature")
_S3_PROTOCOLS = ("s3", "s3a")


def is_url(path: str) -> bool:
    """True for `proto://...` (any protocol but `file`), False for a local path."""
    protocol, _ = split_protocol(str(path))
    return protocol not in (None, "file", "local")


def protocol_of(url: str) -> str:
    protocol, _ = split_protocol(str(url))
    return "file" if protocol in (None, "local") else protocol


def env_storage_options(protocol: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The options the environment gives for `protocol` (see module doc), read now."""
    env = dict(os.environ if environ is None else environ)
    conf: dict[str, dict] = {}
    set_conf_env(conf, env)
    opts = dict(conf.get(protocol, {}))
    if protocol in _S3_PROTOCOLS:
        client_kwargs = opts.get("client_kwargs") or {}
        if "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
            if endpoint:
                opts["endpoint_url"] = endpoint
        if "key" not in opts and "secret" not in opts and env.get("AWS_ACCESS_KEY_ID"):
            opts["key"] = env["AWS_ACCESS_KEY_ID"]
            if env.get("AWS_SECRET_ACCESS_KEY"):
                opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
            if env.get("AWS_SESSION_TOKEN"):
                opts["token"] = env["AWS_SESSION_TOKEN"]
    return opts


def storage_options_for(url: str, **storage_options: Any) -> dict[str, Any]:
    """Environment options for `url`'s protocol, updated with the explicit ones."""
    protocol = protocol_of(url)
    if protocol == "file":
        return dict(storage_options)
    return {**env_storage_options(protocol), **storage_options}


def open_fs(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL; see the module doc for options."""
    url = os.fspath(url)
    if not str(url):
        raise ValueError("open_fs: empty path or URL")
    opts = storage_options_for(url, **storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        raise type(e)(f"cannot open {describe(url, opts)}: {e}") from None
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL ('/' inside URLs; empty parts are skipped)."""
    url = os.fspath(url)
    parts = tuple(str(p) for p in parts if p not in ("", None))
    if not parts:
        return url
    parts = tuple(p.lstrip("/") for p in parts)  # a part never resets the root
    if is_url(url) or url.startswith("file://"):
        return posixpath.join(url, *parts)
    return os.path.join(url, *parts)


def exists(url: str, **storage_options: Any) -> bool:
    fs, path = open_fs(url, **storage_options)
    return fs.exists(path)


def isdir(url: str, **storage_options: Any) -> bool:
    fs, path = open_fs(url, **storage_options)
    return fs.isdir(path)


def open_binary(url: str, mode: str = "rb", **storage_options: Any) -> IO[bytes]:
    """An open binary file (a context manager). Local paths use the builtin `open`."""
    if "b" not in mode:
        raise ValueError(f"open_binary: mode {mode!r} is not binary (use 'rb', 'wb', 'ab')")
    if not is_url(url):
        local = url[len("file://"):] if str(url).startswith("file://") else url
        if "w" in mode or "a" in mode:
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        return open(local, mode)
    fs, path = open_fs(url, **storage_options)
    return fs.open(path, mode)


def read_bytes(url: str, **storage_options: Any) -> bytes:
    with open_binary(url, **storage_options) as f:
        return f.read()


def read_text(url: str, encoding: str = "utf-8", **storage_options: Any) -> str:
    """The file's text; a missing file raises FileNotFoundError naming `url`."""
    try:
        data = read_bytes(url, **storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {url}") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{url}: not {encoding} text ({e})") from None


def read_json(url: str, **storage_options: Any) -> Any:
    """Parsed JSON; errors name the file (and line/column for a syntax error)."""
    text = read_text(url, **storage_options)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: malformed JSON at line {e.lineno}, column {e.colno}: "
                         f"{e.msg}") from None


def write_bytes(url: str, data: bytes, **storage_options: Any) -> None:
    with open_binary(url, "wb", **storage_options) as f:
        f.write(data)


def write_json(url: str, obj: Any, indent: int | None = 1, **storage_options: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=indent).encode(), **storage_options)


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """A copy of `options` with every credential-looking value replaced by '***' (recursive)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(w in str(k).lower() for w in _SECRET_WORDS) and v not in (None, ""):
            out[k] = "***"
        else:
            out[k] = v
    return out


def describe(url: str, options: dict[str, Any] | None = None) -> str:
    """`url` plus its non-secret options, for messages."""
    if not options:
        return str(url)
    return f"{url} (storage options {redact(options)})"


__all__ = ["open_fs", "join", "exists", "isdir", "open_binary", "read_bytes", "read_text",
           "read_json", "write_bytes", "write_json", "is_url", "protocol_of",
           "env_storage_options", "storage_options_for", "redact", "describe"]
