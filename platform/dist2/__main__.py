from dist2.cli import main

raise SystemExit(main())
