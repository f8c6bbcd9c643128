from vhostnet.launch.cli import main

raise SystemExit(main())
