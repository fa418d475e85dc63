"""Everything DICOM in pacs-ai: the Storage SCP, the spool, the journal and
study completion (and, later, series loading, report writers and the sender).

This package never imports Celery or ``inference``: the node is handed an
``on_study_complete(study)`` callable by the composition root
(``study_queue``).
"""
