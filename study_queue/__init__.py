"""The glue of pacs-ai: settings, the ``pacs-ai`` CLI (the composition root)
and, later, the Celery app and its tasks. Imports ``dicom_node`` and
``inference``; neither imports it."""
