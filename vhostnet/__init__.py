"""vhostnet: a virtio-net device for QEMU over vhost-user, with an embedded TCP/IP stack."""
__version__ = "0.1.0"
