"""The ``autopar`` command line: ``capture``, ``demo`` (and later plan/show/diff/explain)."""
