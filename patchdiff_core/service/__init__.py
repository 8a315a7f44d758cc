"""The service contract shared by the API and the workers, torch-free: settings, job records in Redis,
the object store, the HTTP client and the one-command `serve`."""
