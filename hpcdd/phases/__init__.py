"""The phases of a run, one module each (``run(ctx)``), and ``context`` (what every phase is given).
Their order and what each needs: ``hpcdd.registry``. A phase imports no other phase."""
