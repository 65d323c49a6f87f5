"""Secrets inside URLs, hidden before anything is printed or logged.

A URL can carry a credential: `https://user:token@host/shards` (userinfo), or a signed query
(`?X-Amz-Signature=...`, `?token=...`, `?sig=...`). hiervl prints paths and URLs in its errors,
its log lines and its summaries; `redact` replaces the user name and password of every URL in a
text with `***`, and the value of every query parameter whose name says key, token, signature,
secret, password, credential or auth. `RedactingStream` applies it to everything a command prints
(launch/cli.py wraps stdout and stderr with it); pipeline/log.py's handlers apply it to every record.

Owns: recognising and hiding credentials in text.
Must not touch: the URLs the code uses (pipeline/storage.py reads them as given).
"""

from __future__ import annotations

import re

HIDDEN = "***"
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#'\"]+@")
_SECRET_PARAM = re.compile(r"([?&;][^=&\s#'\"]*(?:sig|signature|token|key|secret|passw|pwd|credential|auth|session)"
                           r"[^=&\s#'\"]*=)[^&\s#'\"]+", re.IGNORECASE)


def redact(text) -> str:
    """`text` (any object, as str) with URL credentials replaced by *** (see the module docstring)."""
    text = str(text)
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_PARAM.sub(rf"\g<1>{HIDDEN}", _USERINFO.sub(rf"\g<1>{HIDDEN}@", text))


class RedactingStream:
    """A text stream (sys.stdout / sys.stderr) whose `write` hides URL credentials; everything else
    (flush, isatty, encoding, fileno...) is the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)
