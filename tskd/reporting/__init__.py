"""Results: the report (``report``: tables, ``report_tables``; the paired comparisons,
``report_paired`` on ``paired``; published figures, ``reference_numbers``; model sizes,
``model_cost``; one HTML page, ``report_html``), the ablation study (``study``), the figures
(``plots``) and the report on MLflow (``publish``). Reads what runs wrote; trains nothing."""
