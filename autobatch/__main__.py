from autobatch.cli import main

raise SystemExit(main())
