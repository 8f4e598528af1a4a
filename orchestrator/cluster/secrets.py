"""Network and secret hygiene for the Ray side: reach an address quickly or fail with one
line, and never forward credentials into a Ray runtime env (which Ray stores in the GCS,
shows in the dashboard and writes to job logs)."""
from __future__ import annotations

import socket
from urllib.parse import urlsplit

from mergenet_core.errors import MergenetError, short

#: default ports of Ray address forms (``ray://`` is the Ray Client server)
DEFAULT_PORTS = {"ray": 10001, "": 6379, "http": 8265, "https": 8265}


def _host_port(address: str) -> tuple[str, int] | None:
    if address in ("auto", "local") or address.startswith("local"):
        return None
    scheme = address.split("://", 1)[0] if "://" in address else ""
    u = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = u.port or DEFAULT_PORTS.get(scheme, 6379)
    except ValueError:
        raise MergenetError(f"--address {short(address)}: not host:port") from None
    if not u.hostname:
        raise MergenetError(f"--address {short(address)}: names no host")
    return u.hostname, port


def probe_address(address: str, timeout_s: float = 10.0) -> None:
    """Open (and close) a TCP connection to a Ray address; one line if nobody answers."""
    hp = _host_port(address)
    if hp is None:
        return
    host, port = hp
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.timeout:
        raise MergenetError(f"--address {short(address)}: no answer from {short(host, 60)}:{port} within "
                            f"{timeout_s:g} s (is the Ray head up, and the port open?)") from None
    except OSError as e:
        raise MergenetError(f"--address {short(address)}: cannot reach {short(host, 60)}:{port} "
                            f"({e.strerror or type(e).__name__})") from None


#: words of a variable name (split at ``_``) that mark it as a secret
SECRET_WORDS = frozenset({"PASSWORD", "PASSWD", "TOKEN", "SECRET", "CREDENTIAL", "CREDENTIALS", "KEY",
                          "APIKEY", "PASSPHRASE"})


def is_secret_name(name: str) -> bool:
    """``MLFLOW_TRACKING_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``: yes;
    ``TOKENIZERS_PARALLELISM``: no."""
    return any(part in SECRET_WORDS for part in name.upper().split("_"))


def check_no_credentials(name: str, value: str) -> None:
    """A value forwarded to workers must not carry credentials (``https://user:pw@host``)."""
    if "://" in value:
        u = urlsplit(value)
        if u.password or (u.username and "@" in (u.netloc or "")):
            raise MergenetError(f"{name}: holds credentials (user:password@...); give the host only and provision "
                                "the credentials on each node (~/.mlflow/credentials, mode 600)")
