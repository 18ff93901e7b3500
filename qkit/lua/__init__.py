"""The Lua scripts that change a job's state in Redis, one ``.lua`` file each.

Every script names all the keys it touches in KEYS, and every key of a queue
shares the hash tag ``{<queue>}``, so a script runs on Redis Cluster and on
Upstash.  User-supplied names reach a script only as KEYS or ARGV, never as
script text.  Each file starts with a header stating its KEYS, ARGV and reply.
Files named ``_*.lua`` are shared parts: a script's line ``-- include _x.lua``
is replaced by that file's text, so a helper is written once (Redis runs a
script as one self-contained text).
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def from_source(cls, name: str, source: str) -> "Script":
        """A script of this text, with the SHA1 that EVALSHA knows it by."""
        return cls(name=name, source=source, sha=hashlib.sha1(source.encode()).hexdigest())


#: Upstash's shebang for scripts that lock only their KEYS instead of the whole database (docs/upstash.md).
#: Stock Redis 7 refuses the flag ("Unexpected flag in script shebang"), so only the Upstash backend adds it.
KEY_LOCKING_SHEBANG = "#!lua flags=allow-key-locking\n"


@functools.lru_cache(maxsize=None)
def with_key_locking(script: Script) -> Script:
    """``script`` with Upstash's ``allow-key-locking`` shebang first (its own SHA1)."""
    return Script.from_source(script.name, KEY_LOCKING_SHEBANG + script.source)


_INCLUDE = re.compile(r"^-- include (_[a-z_]+)\.lua$", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def load_script(name: str) -> Script:
    """Read ``<name>.lua`` from this package once and remember its SHA1."""
    source = resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
    source = _INCLUDE.sub(lambda m: load_script(m.group(1)).source, source)
    return Script.from_source(name, source)
