"""The service layer: what the API does, without HTTP. Routes call these functions; they take a session (or the
settings to open one) and raise api.services.errors.ServiceError subclasses, which api/main.py maps to statuses."""
