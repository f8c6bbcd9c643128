"""Host side of the guest network: NAT flows, forwards, the DNS upstream relay, TFTP files."""
