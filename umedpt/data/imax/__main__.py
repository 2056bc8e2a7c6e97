"""``python -m umedpt.data.imax``: write a synthetic world and its IMAX / DMAX views."""

from umedpt.data.imax.world import main

raise SystemExit(main())
