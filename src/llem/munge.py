"""MUNGE credentials through libmunge (``libmunge.so.2``, loaded with ctypes).

The gateway (``llem serve``) learns who a remote client is from a MUNGE credential that the
client's munged made, as slurmdbd does: the credential carries the client's uid and gid,
sealed with the cluster's MUNGE key, and a payload (here: the SHA-256 of the request, so a
captured credential cannot be reused for another request). munged on the gateway's host
decodes it and refuses one that is expired, rewound, replayed or made with another key.

No other module loads libmunge; nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

from llem.errors import LlemError

DEFAULT_SOCKET = "/run/munge/munge.socket.2"

_OPT_TTL = 4
_OPT_ENCODE_TIME = 6
_OPT_SOCKET = 8

# munge_err_t values (munge.h)
EMUNGE_SOCKET = 6
EMUNGE_TIMEOUT = 7
EMUNGE_BAD_CRED = 8
EMUNGE_CRED_INVALID = 14
EMUNGE_CRED_EXPIRED = 15
EMUNGE_CRED_REWOUND = 16
EMUNGE_CRED_REPLAYED = 17


class MungeError(LlemError):
    """libmunge is missing, munged cannot be reached, or a credential is refused.

    Attributes:
        code: libmunge's error code (0 when libmunge could not even be loaded).
    """

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Credential:
    """What munged vouches for in a decoded credential."""

    uid: int
    gid: int
    payload: bytes
    encode_time_s: int
    ttl_s: int


_lib = None


def _library():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("munge") or "libmunge.so.2"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise MungeError(f"libmunge not found ({e}); install the munge package") from e
        lib.munge_ctx_create.restype = ctypes.c_void_p
        lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
        lib.munge_strerror.restype = ctypes.c_char_p
        lib.munge_strerror.argtypes = [ctypes.c_int]
        lib.munge_ctx_strerror.restype = ctypes.c_char_p
        lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
        lib.munge_encode.argtypes = [
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        lib.munge_decode.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
        ]
        libc = ctypes.CDLL(None)
        libc.free.argtypes = [ctypes.c_void_p]
        lib.llem_free = libc.free
        _lib = lib
    return _lib


class _Context:
    def __init__(self, socket_path: str | None, ttl_s: int | None = None) -> None:
        self.lib = _library()
        self.ctx = self.lib.munge_ctx_create()
        if not self.ctx:
            raise MungeError("libmunge: cannot create a context (out of memory)")
        if socket_path:
            self._set(_OPT_SOCKET, ctypes.c_char_p(socket_path.encode()))
        if ttl_s is not None:
            self._set(_OPT_TTL, ctypes.c_int(ttl_s))

    def _set(self, opt: int, value) -> None:
        err = self.lib.munge_ctx_set(ctypes.c_void_p(self.ctx), ctypes.c_int(opt), value)
        if err:
            raise MungeError(f"libmunge: {self.error(err)}", err)

    def get_int(self, opt: int, ctype=ctypes.c_int) -> int:
        out = ctype(0)
        err = self.lib.munge_ctx_get(
            ctypes.c_void_p(self.ctx), ctypes.c_int(opt), ctypes.byref(out)
        )
        return out.value if not err else 0

    def error(self, err: int) -> str:
        text = self.lib.munge_ctx_strerror(self.ctx) or self.lib.munge_strerror(err)
        return text.decode(errors="replace")

    def close(self) -> None:
        self.lib.munge_ctx_destroy(self.ctx)


def encode(payload: bytes, socket_path: str | None = None, ttl_s: int | None = None) -> str:
    """A credential for the calling process's uid and gid, carrying ``payload``.

    Raises:
        MungeError: libmunge missing, or munged not reachable.
    """
    ctx = _Context(socket_path, ttl_s)
    try:
        cred = ctypes.c_char_p()
        buf = ctypes.create_string_buffer(payload, len(payload))
        err = ctx.lib.munge_encode(ctypes.byref(cred), ctypes.c_void_p(ctx.ctx), buf, len(payload))
        if err:
            raise MungeError(f"munge: {ctx.error(err)}", err)
        text = cred.value.decode("ascii")
        ctx.lib.llem_free(ctypes.cast(cred, ctypes.c_void_p))
        return text
    finally:
        ctx.close()


def decode(cred: str, socket_path: str | None = None) -> Credential:
    """Check a credential with munged and return what it vouches for.

    Raises:
        MungeError: munged refused it (``code``: expired, rewound, replayed, invalid, ...) or
            cannot be reached.
    """
    ctx = _Context(socket_path)
    buf = ctypes.c_void_p()
    length = ctypes.c_int(0)
    uid = ctypes.c_uint32(0)
    gid = ctypes.c_uint32(0)
    try:
        err = ctx.lib.munge_decode(
            cred.encode("ascii", errors="replace"),
            ctypes.c_void_p(ctx.ctx),
            ctypes.byref(buf),
            ctypes.byref(length),
            ctypes.byref(uid),
            ctypes.byref(gid),
        )
        payload = ctypes.string_at(buf, length.value) if buf.value else b""
        if buf.value:
            ctx.lib.llem_free(buf)
        if err:
            raise MungeError(f"munge: {ctx.error(err)}", err)
        return Credential(
            uid=uid.value,
            gid=gid.value,
            payload=payload,
            encode_time_s=ctx.get_int(_OPT_ENCODE_TIME, ctypes.c_long),
            ttl_s=ctx.get_int(_OPT_TTL),
        )
    finally:
        ctx.close()
