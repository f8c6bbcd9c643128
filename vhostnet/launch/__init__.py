"""Starting things: the `vhostnet` command and its composition root.

    cli.py    argument parsing and the sub-commands
    serve.py  the composition root: device, server, control socket and taps, wired once
    run.py    the backend and a QEMU guest in one trio run (--reconnect: the
              backend as a child process, restarted whenever it exits)
    qemu.py   QEMU flags, the test image, accelerator choice
    conventions.py  QEMU's backend program conventions: --fd checks,
              --print-capabilities, the discovery file
"""
