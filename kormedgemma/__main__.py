from kormedgemma.cli import main

raise SystemExit(main())
