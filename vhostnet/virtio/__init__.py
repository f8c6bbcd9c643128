"""virtio rings and feature bits (virtio 1.2 §2.7 split virtqueues, §6 reserved features).

    features.py  feature bit numbers and names
    ring.py      the ring interface the device uses (a packed ring would be a second implementation)
    split.py     the split virtqueue over guest memory: chains in, used elements out
    findings.py  a driver's spec violations, each named with its virtio 1.2 section
"""
