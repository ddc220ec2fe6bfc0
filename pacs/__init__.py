"""The DICOM face of pocketpacs: Verification and Storage SCP over pynetdicom."""
