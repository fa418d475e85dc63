"""Everything numeric in pacs-ai: model specs, engines, pre/post-processing,
findings and phantoms. Never imports pydicom, ``dicom_node`` or ``study_queue``."""
