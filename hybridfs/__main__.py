from hybridfs.cli import main

raise SystemExit(main())
