"""The virtio-net device (virtio 1.2 §5.1).

    header.py  struct virtio_net_hdr (§5.1.6) <-> a stack Frame's offload fields
    device.py  NetDevice: TX chains -> link layers -> stack; stack -> RX buffers
"""
