"""What the network services (DHCP, DNS, TFTP) do, chosen by the device side.

The stack builds the services from one `ServicesConfig` passed to `Stack`
(constructor injection); `None` there means no services at all, which is
what the low-level stack tests use. Each limit here bounds a resource.

`tftp_files` is the only way the stack reaches a file system: an object the
device side builds (vhostnet/hostnet/tftp_root.py) with `open(name)` ->
file with `.size`, `.read(offset, n)` and `.close()`, raising
`TftpFileError` (stack/services/tftp.py) for refusals. None turns TFTP off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ServicesConfig"]

DEFAULT_LEASE_TIME = 86400         # seconds; one day, as slirp gives
DEFAULT_POOL_SIZE = 16             # addresses from the guest address up, as slirp's NB_BOOTP_CLIENTS
DEFAULT_DNS_TIMEOUT = 5.0          # RFC 1035 §4.2.1 leaves it open; resolv.conf's default is 5 s
DEFAULT_DNS_MAX_INFLIGHT = 64
DEFAULT_DNS_TCP_MAX_CONNS = 16
DEFAULT_TFTP_MAX_TRANSFERS = 8
DEFAULT_TFTP_MAX_FILE = 1 << 30    # 1 GiB: far above any kernel + initrd
DEFAULT_TFTP_TIMEOUT = 1.0         # seconds before the first retransmission (RFC 2349 default range 1..255)
DEFAULT_TFTP_RETRIES = 5


@dataclass(frozen=True)
class ServicesConfig:
    dhcp: bool = True
    dns: bool = True
    restrict: bool = False           # no router and no DNS in DHCP replies (slirp's restrict=on)
    lease_time: int = DEFAULT_LEASE_TIME
    pool_size: int = DEFAULT_POOL_SIZE
    dns_timeout: float = DEFAULT_DNS_TIMEOUT
    dns_max_inflight: int = DEFAULT_DNS_MAX_INFLIGHT
    dns_tcp_max_conns: int = DEFAULT_DNS_TCP_MAX_CONNS
    tftp_files: Any = None
    bootfile: str | None = None
    tftp_max_transfers: int = DEFAULT_TFTP_MAX_TRANSFERS
    tftp_max_file: int = DEFAULT_TFTP_MAX_FILE
    tftp_timeout: float = DEFAULT_TFTP_TIMEOUT
    tftp_retries: int = DEFAULT_TFTP_RETRIES

    def __post_init__(self) -> None:
        if not 60 <= self.lease_time <= 0xFFFFFFFE:
            raise ValueError(f"lease time {self.lease_time} out of range 60..4294967294 s")
        if not 1 <= self.pool_size <= 64:
            raise ValueError(f"DHCP pool size {self.pool_size} out of range 1..64")
        if not 0 < self.dns_timeout <= 60:
            raise ValueError(f"DNS timeout {self.dns_timeout} out of range (0, 60] s")
        if not 1 <= self.dns_max_inflight <= 4096:
            raise ValueError(f"DNS in-flight cap {self.dns_max_inflight} out of range 1..4096")
        if not 1 <= self.tftp_max_transfers <= 256:
            raise ValueError(f"TFTP transfer cap {self.tftp_max_transfers} out of range 1..256")
        if self.bootfile is not None and (not self.bootfile or len(self.bootfile.encode()) > 127
                                          or "\0" in self.bootfile):
            raise ValueError("boot file name must be 1..127 bytes without NUL (RFC 2131 §2 'file')")

    @property
    def tftp(self) -> bool:
        return self.tftp_files is not None
