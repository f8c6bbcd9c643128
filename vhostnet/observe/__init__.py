"""Looking inside a running backend.

    control.py  the control socket (JSON lines) behind inspect / stats / capture
    report.py   the documents it serves, built from read-only ring and device views
    render.py   those documents as text
    decode.py   descriptor chains and frames as tcpdump-like lines and hexdumps
    pcap.py     pcap writing and checksum completion for captures
"""
