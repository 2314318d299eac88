from tfmerge.cli import main

raise SystemExit(main())
