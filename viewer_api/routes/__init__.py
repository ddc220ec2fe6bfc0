"""One router per resource, assembled in `viewer_api.app`."""
