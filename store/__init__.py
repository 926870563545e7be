"""Persistence shared by the API and the workers: settings, database models and sessions, the artifact store."""
