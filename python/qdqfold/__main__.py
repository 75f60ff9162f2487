from ._start import main

raise SystemExit(main())
