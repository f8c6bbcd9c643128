"""The TFTP server's files: a read-only view of one host directory.

The sans-IO TFTP server (stack/services/tftp.py) never opens a file; the
device side builds a `TftpRoot` and passes it in through ServicesConfig.
The stack has already refused absolute names and '..'; this object is the
second line and the one that knows the file system:

* The name is resolved with every symlink followed (os.path.realpath) and
  must stay inside the real root directory; a symlink pointing out is
  refused as an access violation, one pointing elsewhere inside is served.
* The resolved file is opened with O_NOFOLLOW (so a symlink swapped in
  after the check is refused too) and must be a regular file; devices,
  FIFOs and directories are refused without blocking on them (O_NONBLOCK).
* Files stay open for the transfer and are read with os.pread, so a file
  replaced on disk mid-transfer is served consistently from the old inode.

Reads are synchronous: they are page-cache reads of at most one block
(64 KiB) per ACK from the guest.
"""
from __future__ import annotations

import errno
import os
import stat

from stack.services.tftp import ERR_ACCESS, ERR_NOT_FOUND, TftpFileError

__all__ = ["TftpRoot"]


class _File:
    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size

    def read(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class TftpRoot:
    def __init__(self, directory: str):
        real = os.path.realpath(directory)
        if not os.path.isdir(real):
            raise ValueError(f"TFTP directory {directory!r} is not a directory")
        self.root = real

    def open(self, name: str) -> _File:
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([self.root, path]) != self.root or path == self.root:
            raise TftpFileError(ERR_ACCESS, "outside the TFTP directory")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TftpFileError(ERR_NOT_FOUND, "file not found") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise TftpFileError(ERR_ACCESS, "symlink changed during open") from None
            raise TftpFileError(ERR_ACCESS, e.strerror or "cannot open") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TftpFileError(ERR_ACCESS, "not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return _File(fd, st.st_size)
