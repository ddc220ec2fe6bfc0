"""The HTTP face of pocketpacs (FastAPI): health and metrics now; DICOMweb, rendering,
share links and the patient page as they arrive."""
