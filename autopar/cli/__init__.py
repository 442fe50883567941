"""The ``autopar`` command line: ``capture``, ``plan``, ``show``, ``diff``, ``explain``, ``run``,
``demo``, ``calibrate`` and ``sweep``.

Layer: the top one. Commands parse arguments and call the layers below (``compile``, ``plan_api``,
``views``, ``calibration``); a user mistake prints one line and exits 2.
"""
