"""The cost model of local clusters (``local:N``: one-thread CPU processes over gloo on this machine).

Data flow: ``cost_models.estimate`` hands a Plan on a local cluster to ``step.estimate_local`` →
per-stage compute from this machine's measured rates (``compute``, ``rates``: matmul efficiency by
shape, elementwise bandwidth, per-op overheads) sharing the cores as the ranks do (``shared_cores``)
→ ``Predicted``. The rates come from the profile ``autopar calibrate`` saved (``profile``), or from
placeholders that say they are not measured.
"""
