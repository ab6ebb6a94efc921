"""The offline side: read a run's report and event files back, and render the HTML report.

* :mod:`~healthmon.report.reader`: find the runs under a path and their alerts (``healthmon check``).
* :mod:`~healthmon.report.schema`: field-by-field validation of reports and alert records.
* :mod:`~healthmon.report.events`: TensorBoard event files (alert records, scalar series).
* :mod:`~healthmon.report.run_data`: alerts, scalars and metadata of a run, read once.
* :mod:`~healthmon.report.charts`: the report's charts (matplotlib, lazily imported).
* :mod:`~healthmon.report.html`: the self-contained HTML page.

The writers (TensorBoard, the JSON report, the console) live in :mod:`healthmon.sinks`. Nothing
here imports torch or Lightning: the CLI stays fast.
"""
