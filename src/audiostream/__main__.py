from audiostream.cli import main

raise SystemExit(main())
