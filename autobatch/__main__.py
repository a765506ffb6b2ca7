from autobatch.cli.main import main

raise SystemExit(main())
